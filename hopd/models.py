"""Models and tokenizers: the testbed's character tokenizer, tiny Llama configs, loading, checks.

Everything goes through the Hugging Face parts users use with real checkpoints
(`PreTrainedTokenizerFast`, `AutoModelForCausalLM`, safetensors), so code that works on the testbed
works unchanged on a local checkpoint pair.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from hopd.config import ConfigError
from hopd.distill_config import BUNDLED, check_model_name
from hopd.tasks.chain import VARIABLES

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = "0123456789" + VARIABLES + "=+-*;:?#., \n"
# The user turn ends with a newline; the assistant turn ends with EOS. No generation prompt is
# needed beyond the newline, so a prompt is exactly: BOS + program + "\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
)
BUNDLED_DIR = Path(__file__).parent / "checkpoints"  # the folders of distill_config.BUNDLED


def build_testbed_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with pad/bos/eos/unk and a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass(frozen=True)
class TinySize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


# Named sizes for the testbed. `teacher` is what the bundled teacher uses; `student` is smaller.
TINY_SIZES = {
    "teacher": TinySize(hidden=128, layers=4, heads=4, intermediate=512),
    "student": TinySize(hidden=96, layers=3, heads=4, intermediate=384),
    "micro": TinySize(hidden=32, layers=2, heads=2, intermediate=64),  # for tests
}


def tiny_llama(size: str, tokenizer: PreTrainedTokenizerBase, max_positions: int = 1024,
               seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised `LlamaForCausalLM` of a named size for `tokenizer`'s vocabulary."""
    if size not in TINY_SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {sorted(TINY_SIZES)}")
    s = TINY_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def resolve_model_path(name: str) -> Path:
    """A local path for a model name: a bundled `testbed:*` name, a directory, a `.gguf` file or
    a packaged GGUF name such as `smollm2:135m-instruct` (converted once into hopd's cache)."""
    from hopd.gguf_models import cached_folder, is_gguf

    check_model_name(name)
    if is_gguf(name):
        return cached_folder(name)
    if name in BUNDLED:
        path = BUNDLED_DIR / BUNDLED[name]
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"bundled checkpoint {name} is missing at {path}; reinstall hopd or rebuild it "
                "with the command in the README"
            )
        return path
    path = Path(name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model directory {path} has no config.json: not an HF checkpoint")
    return path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_custom_code(path: Path, trust_remote_code: bool) -> None:
    """Refuses a model folder that ships its own Python code unless the user trusts it.

    transformers runs such code (`auto_map` in config.json or tokenizer_config.json) only with
    trust_remote_code=True; hopd passes False unless the config says otherwise, and says so
    here before transformers would ask on the terminal."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            meta = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("auto_map"):
            raise ConfigError(
                f"model folder {path} ships its own code ({name} names auto_map "
                f"{sorted(meta['auto_map'])}); hopd never runs a model folder's code unless you "
                "ask: read the .py files there, then set trust_remote_code=true")


def load_model(name: str, device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False) -> PreTrainedModel:
    """Loads a causal LM from safetensors; bundled 16-bit checkpoints are upcast to `dtype`.

    A folder's own Python code runs only with `trust_remote_code=True`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    path = resolve_model_path(name)
    check_custom_code(path, trust_remote_code)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"model directory {path} has no .safetensors weights (hopd loads "
                                "weights only from safetensors; convert .bin files first)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                     use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # safetensors, torch and transformers raise many types here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load the model in {path}: {first}. The checkpoint may be "
                         "truncated or corrupt; re-save it or point to another one") from None
    return model.to(device)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name)
    check_custom_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load the tokenizer in {path}: {first}") from None
    if tok.pad_token is None:  # many real checkpoints ship without one
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path,
                    dtype: torch.dtype | None = None) -> None:
    """Saves model (safetensors) and tokenizer in HF format; `dtype` e.g. bf16 for small files."""
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in model.state_dict().items()}
        model.save_pretrained(path, state_dict=state)
    else:
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    from hopd.runstate import make_readable  # (runstate imports torch and this module's deps)

    make_readable(path)


def attach_lora(model: PreTrainedModel, rank: int, alpha: float, dropout: float,
                target_modules: list[str], adapter: Path | None = None) -> PreTrainedModel:
    """Wraps `model` with PEFT LoRA adapters (trainable), or reloads saved ones from `adapter`."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("lora.rank > 0 needs PEFT: pip install 'hopd[lora]' (or pip install "
                         "peft)") from None
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    targets: str | list[str] = target_modules
    if target_modules == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def base_model(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (adapters stay active inside its layers)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def check_compatible(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                     teacher_vocab: int, student_vocab: int) -> None:
    """Fails with a clear message unless teacher and student share the vocabulary exactly."""
    problems = []
    # Real families pad their embedding matrices differently (Qwen2.5 1.5B: 151936 rows, 7B:
    # 152064), so sizes may differ as long as both cover every token the tokenizer can produce;
    # losses then use the first min(V_teacher, V_student) logits.
    if min(teacher_vocab, student_vocab) < len(student_tok):
        problems.append(f"an output vocabulary is smaller than the tokenizer (teacher "
                        f"{teacher_vocab}, student {student_vocab}, tokenizer {len(student_tok)})")
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:5]
        problems.append(f"token-id mappings differ (e.g. {diff})")
    for attr in ("eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            problems.append(f"{attr} differs (teacher {getattr(teacher_tok, attr)}, "
                            f"student {getattr(student_tok, attr)})")
    if problems:
        raise ConfigError(
            "teacher and student do not share a tokenizer: " + "; ".join(problems)
            + ". On-policy distillation compares per-token distributions, so both models must use "
            "the same tokenizer; pick a teacher of the student's model family."
        )


def matched_teacher(name: str, student_tok: PreTrainedTokenizerBase, student_vocab: int,
                    trust_remote_code: bool = False
                    ) -> tuple[Path, PreTrainedTokenizerBase, dict, int]:
    """The teacher's folder, tokenizer and config, checked to share the student's tokenizer
    before any weights load; and the vocabulary the two compare on, min(V_teacher, V_student)."""
    path = resolve_model_path(name)
    tok = load_tokenizer(str(path), trust_remote_code)
    conf = json.loads((path / "config.json").read_text())
    vocab = conf.get("vocab_size", len(tok))
    check_compatible(tok, student_tok, vocab, student_vocab)
    return path, tok, conf, min(vocab, student_vocab)


def chunkable(model: torch.nn.Module) -> bool:
    """Whether the model's logits can be computed per chunk of positions from its last hidden
    states: a plain linear output head (no logit soft-capping after it, as Gemma 2 has) and
    whole, not sharded, weights (FSDP shards the head outside its forward)."""
    base = _base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    conf = getattr(base, "config", None)
    return (type(head) is torch.nn.Linear and not hasattr(head.weight, "to_local")
            and not getattr(conf, "final_logit_softcapping", None))


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP or PEFT wrapper."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT


@contextmanager
def hidden_states_out(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block the model's forward returns its last hidden states (after the final
    norm) where it returned logits: its output head is swapped for an identity and handed out,
    to be applied per chunk of positions. The head is put back however the block ends."""
    base = _base(model)
    head = base.get_output_embeddings()
    base.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def cache_kw(model: torch.nn.Module) -> str:
    """The forward() keyword for a KV cache: `cache` in newer transformers, else
    `past_key_values`."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def positions_from_mask(attn_B_T: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attn_B_T.cumsum(-1) - 1).clamp(min=0)


def response_logits(model: PreTrainedModel, ids_B_T: torch.Tensor, attn_B_T: torch.Tensor,
                    prompt_len: int, vocab: int | None = None) -> torch.Tensor:
    """(B, R, V) logits predicting each response token; V cut to `vocab` when given (a prompt
    prefix every row shares runs once: `forward_inputs`)."""
    R = ids_B_T.size(1) - prompt_len
    out = model(**forward_inputs(model, ids_B_T, attn_B_T, prompt_len), logits_to_keep=R + 1)
    logits = out.logits[:, :-1, :]
    return logits[..., :vocab] if vocab is not None else logits


def forward_inputs(model: torch.nn.Module, ids_B_T: torch.Tensor, attn_B_T: torch.Tensor,
                   prompt_len: int, cache: bool = False) -> dict:
    """The keyword arguments of `model`'s forward over left-padded rows whose first
    `prompt_len` columns are prompts; with `cache`, a KV cache that the forward fills.

    When every row's prompt starts with the same tokens (a chat template's system prompt), and
    the model allows it (`shares_prefix`), those tokens run here once, as one row, and the
    arguments are the rows without them (`without_prefix`), continuing from their keys and
    values (`prefix_cache`): the same logits and, through the keys and values, the same
    gradient, for fewer tokens' work. The attention mask then covers prefix + rest."""
    C = shared_prefix_len(ids_B_T, attn_B_T, prompt_len) if shares_prefix(model) else 0
    if not C:
        kw = {"input_ids": ids_B_T, "attention_mask": attn_B_T,
              "position_ids": positions_from_mask(attn_B_T)}
        return {**kw, "use_cache": True, cache_kw(model): DynamicCache()} if cache else kw
    rest_ids, mask = without_prefix(ids_B_T, attn_B_T, C)
    return {"input_ids": rest_ids, "attention_mask": mask,
            "position_ids": positions_from_mask(mask)[:, C:], "use_cache": True,
            cache_kw(model): prefix_cache(model, ids_B_T, attn_B_T, C)}


def left_padding(attn_B_T: torch.Tensor) -> torch.Tensor:
    """(B,) each row's padding columns before its first real token."""
    return (attn_B_T.cumsum(-1) == 0).sum(-1)


# A shared prefix shorter than this is not worth the second forward call it costs.
MIN_SHARED_PREFIX = 16
SHARED_PREFIX_TYPES = {"llama", "mistral", "qwen2", "qwen3"}  # causal decoders, standard cache


def shares_prefix(model: torch.nn.Module) -> bool:
    """Whether `model` may run a shared prompt prefix once: one process (DDP and FSDP expect
    one forward per backward), a Llama-family decoder with full attention (a sliding window
    would see other keys in the two layouts), no gradient checkpointing (which drops the
    cache). HOPD_SHARE_PREFIX=off turns it off."""
    if os.environ.get("HOPD_SHARE_PREFIX", "").lower() in ("off", "0", "false"):
        return False
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
            torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return False
    base = _base(model)
    conf = getattr(base, "config", None)
    return (getattr(conf, "model_type", None) in SHARED_PREFIX_TYPES
            and not (getattr(conf, "sliding_window", None)
                     and getattr(conf, "use_sliding_window", True))
            and not getattr(base, "is_gradient_checkpointing", False))


def shared_prefix_len(ids_B_T: torch.Tensor, attn_B_T: torch.Tensor, prompt_len: int) -> int:
    """How many tokens every row's prompt starts with alike, after its left padding; each row
    keeps at least its last prompt token out of it. 0 when under MIN_SHARED_PREFIX, for one
    row, or when a prompt has padding other than on its left."""
    B = ids_B_T.size(0)
    prompt = attn_B_T[:, :prompt_len]
    starts = left_padding(prompt)
    n = prompt_len - int(starts.max()) - 1  # the shortest prompt, less its last token
    if B < 2 or n < MIN_SHARED_PREFIX or int(prompt.sum()) != int((prompt_len - starts).sum()):
        return 0
    cols = starts[:, None] + torch.arange(n, device=ids_B_T.device)
    first = ids_B_T.gather(1, cols)
    same = (first == first[:1]).all(0)
    C = n if bool(same.all()) else int(same.int().argmin())  # the first column that differs
    return C if C >= MIN_SHARED_PREFIX else 0


def prefix_cache(model: torch.nn.Module, ids_B_T: torch.Tensor, attn_B_T: torch.Tensor,
                 C: int) -> DynamicCache:
    """The keys and values of the rows' shared first C real tokens, computed as one row and
    expanded to every row (a cache for `without_prefix`'s rows to continue from)."""
    B = ids_B_T.size(0)
    start = int(left_padding(attn_B_T[:1]))
    device = ids_B_T.device
    one = DynamicCache()  # filled by the forward, whatever the output calls it
    model(input_ids=ids_B_T[:1, start:start + C],
          attention_mask=torch.ones(1, C, dtype=attn_B_T.dtype, device=device),
          position_ids=torch.arange(C, device=device)[None], use_cache=True, logits_to_keep=1,
          **{cache_kw(model): one})
    return DynamicCache(ddp_cache_data=[
        (layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1))
        for layer in one.layers])


def without_prefix(ids_B_T: torch.Tensor, attn_B_T: torch.Tensor, C: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with their first C real tokens taken out, (B, T - C) (left padding moves up
    against the rest), and the attention mask of prefix + rest, (B, T): C ones, then the
    rest's own; positions from that mask continue from C."""
    B, T = ids_B_T.shape
    starts = left_padding(attn_B_T)[:, None]
    # column j of the rest is column j of the row inside its left padding, j + C after it
    j = torch.arange(T - C, device=ids_B_T.device)[None].expand(B, -1)
    cols = j + C * (j >= starts)
    rest_attn = attn_B_T.gather(1, cols)
    mask = torch.cat([torch.ones_like(attn_B_T[:, :C]), rest_attn], dim=-1)
    return ids_B_T.gather(1, cols), mask
