"""The `hopd` command.

    hopd sft [CONFIG] --out DIR [key=value ...]     supervised training (teacher, warm student)
    hopd eval --model MODEL [--n N] [--out FILE]    full-budget evaluation
    hopd distill CONFIG --out DIR [key=value ...]   on-policy distillation with a horizon schedule
    hopd compare [CONFIG] --out DIR                 OPD vs POPD vs TOPD from the same student
    hopd report DIR...                              plots and report.md from run folders
    hopd demo [--quick] [--out DIR] [--device D]    the built-in comparison on the testbed
    hopd config show [CONFIG] [key=value ...]       every setting, its value and its meaning
    hopd convert FILE.gguf --out DIR                a GGUF file as a Hugging Face folder
    hopd prune MODEL --layers K --out DIR           a student: the teacher's K most useful layers

Bad input (a `ConfigError`: config, data, models, run folder, teacher server) exits with code 2
and one line that names the problem and the fix; any other exception is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from pathlib import Path

from hopd.cli_models import add_model_tools, quiet_hf
from hopd.config import ConfigError


def _cmd_sft(args: argparse.Namespace) -> int:
    quiet_hf()
    from hopd import config as C
    from hopd.sft import SFTConfig, train_sft

    _split_config(args)
    cfg = C.load(SFTConfig, args.config, args.overrides)
    train_sft(cfg, Path(args.out), progress=not args.quiet, overwrite=args.overwrite)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from hopd.distill_config import check_model_name

    for key in ("model", "teacher"):  # an unknown model is said before anything heavy is loaded
        if getattr(args, key):
            check_model_name(_model_dir(getattr(args, key)), key)
    quiet_hf()
    import torch

    from hopd import evalcache
    from hopd.evaluate import evaluate
    from hopd.models import load_model, load_tokenizer
    from hopd.progress import clean_json
    from hopd.runstate import write_json
    from hopd.tasks import PromptSource

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: must be >= 1")
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: must be >= 0 (0: torch's default)")
    if args.budget < 0:
        raise ConfigError(f"--budget {args.budget}: must be >= 1 (0: the task's default)")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"--temperature {args.temperature}: must be a number > 0 (greedy "
                          "decoding is --samples 1)")
    if args.kl_n < 0:
        raise ConfigError(f"--kl-n {args.kl_n}: must be >= 0")
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder: give a file name, e.g. "
                          f"{Path(args.out) / 'eval.json'}")
    args.device = _check_device(args.device)
    source = PromptSource(args.task, args.eval_data)
    budget = args.budget or source.default_budget()
    examples = source.eval_set(args.n, seed=args.seed, part=args.split)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = _model_dir(args.model)
    tok = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    teacher, vocab = _eval_teacher(args, tok)
    model = load_model(name, device=args.device, trust_remote_code=args.trust_remote_code)
    res = evaluate(model, tok, examples, source.is_correct if source.has_answers else None,
                   budget, batch_size=args.batch_size, samples=args.samples,
                   temperature=args.temperature, seed=args.seed, keep_responses=args.show,
                   progress=not args.quiet, teacher=teacher, kl_n=args.kl_n, vocab=vocab,
                   cache=not args.no_cache)
    if res.get("cached"):
        print(f"hopd eval: the same weights, prompts and settings were evaluated before "
              f"({res['cached_eval_time_s']:.0f} s then); read back from {evalcache.cache_dir()}"
              " (--no-cache evaluates again)", file=sys.stderr)
    res.update({"model": args.model, "task": args.task, "teacher": args.teacher or None})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), res)
    print(json.dumps(clean_json(res), indent=2))
    return 0


def _eval_teacher(args: argparse.Namespace, tok: object) -> tuple[object, int | None]:
    """hopd eval --teacher: the teacher that scores the held-out KL and NLL (checked to share
    the student's tokenizer before either model loads)."""
    if not args.teacher:
        return None, None
    from hopd.models import load_model, matched_teacher
    from hopd.teacher import LocalTeacher

    t_path, _, _, vocab = matched_teacher(_model_dir(args.teacher), tok,  # type: ignore[arg-type]
                                          len(tok),  # type: ignore[arg-type]
                                          args.trust_remote_code)
    model = load_model(str(t_path), device=args.device,
                       trust_remote_code=args.trust_remote_code).eval().requires_grad_(False)
    return LocalTeacher(model, vocab), vocab


def _resume_target(args: argparse.Namespace) -> None:
    """`--resume RUN`: the run folder is RUN, and its own config.yaml is the config unless one
    is given beside it."""
    if isinstance(args.resume, str) and "=" in args.resume and not _exists(args.resume):
        args.overrides = [args.resume, *(args.overrides or [])]  # `--resume key=value ...`
        args.resume = True
    if not isinstance(args.resume, str):
        if not args.out:
            raise ConfigError("give --out RUN (a new run folder), or --resume RUN to continue one")
        if args.resume and not Path(args.out).is_dir():
            raise ConfigError(f"--resume: there is no run folder {args.out} to continue; start "
                              "the run without --resume")
        return
    if args.resume.endswith((".yaml", ".yml")) and Path(args.resume).is_file():
        args.config, args.resume = args.resume, True  # `--resume CONFIG --out RUN`, as before
        return _resume_target(args)
    run = Path(args.resume)
    if args.out and Path(args.out).resolve() != run.resolve():
        raise ConfigError(f"--resume {run} and --out {args.out} name different folders: give one")
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--resume {run}: no run to continue there (no config.yaml); start it "
                          "with hopd distill CONFIG --out RUN")
    args.out, args.resume = str(run), True
    if not args.config:
        args.config = str(run / "config.yaml")


def _cmd_distill(args: argparse.Namespace) -> int:
    from hopd.distill_config import check_paths, load_config

    _split_config(args)
    _resume_target(args)
    cfg = load_config(args.config, args.overrides)  # before torch: a typo is reported at once
    check_paths(cfg)
    quiet_hf()
    from hopd.distill import distill

    result = distill(cfg, Path(args.out), resume=args.resume, progress=not args.quiet,
                     overwrite=args.overwrite, force_config=args.force_config)
    return _signal_status(result.get("signal", 0))


def _cmd_compare(args: argparse.Namespace) -> int:
    quiet_hf()
    from hopd.compare import DEFAULT, budget_overrides, compare, parse_lrs, parse_strategies
    from hopd.report import write_report

    _split_config(args)
    strategies = parse_strategies(args.strategies or ",".join(DEFAULT))
    seeds = _parse_seeds(args.seeds)
    out = Path(args.out)
    budget = budget_overrides(args.steps, args.seconds, args.tokens)
    lrs = parse_lrs(args.lrs) if args.lrs else None
    runs, signum = compare(args.config, out, strategies, seeds, args.overrides, budget,
                           progress=not args.quiet, resume=args.resume, overwrite=args.overwrite,
                           lrs=lrs, jobs=args.jobs)
    if signum:
        return _signal_status(signum)
    summary = write_report(runs, out)
    _print_summary(summary, out / "report.md")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from hopd.report import write_report

    paths = [Path(p) for p in args.runs]
    out = Path(args.out) if args.out else paths[0]
    summary = write_report(paths, out)
    _print_summary(summary, out / "report.md")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    quiet_hf()
    from hopd.demo import run_demo

    default = "runs/demo" + ("-fork" if args.regime == "fork" else "") + \
        ("-quick" if args.quick else "")
    out = Path(args.out or default)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    summary, signum = run_demo(out, quick=args.quick, progress=not args.quiet,
                               resume=args.resume, device=device, overwrite=args.overwrite,
                               regime=args.regime)
    if signum:
        return _signal_status(signum)
    _print_summary(summary, out / "report.md")
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give integers separated by commas, "
                          "e.g. 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds is empty: give at least one seed, e.g. 0")
    return seeds


def _print_summary(summary: dict, report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from hopd.report import table_rows, verdicts

    rows = table_rows(summary)
    keep = [0, 2, 3, 6, 7, 8, 10, 11]  # the columns that fit a terminal
    table = Table(title="hopd: strategies compared at the full budget L")
    for i in keep:
        table.add_column(rows[0][i], justify="left" if i == 0 else "right")
    for r in rows[1:]:
        table.add_row(*[r[i] for i in keep])
    console = Console()
    console.print(table)
    for v in verdicts(summary):
        console.print("- " + v.replace("**", "").replace("`", ""))
    console.print(f"report: {report}")


def _cmd_serve_teacher(args: argparse.Namespace) -> int:
    quiet_hf()
    import os

    from hopd.models import load_model, load_tokenizer
    from hopd.serve import TOKEN_ENV, make_server

    args.device = _check_device(args.device)
    token = args.token or os.environ.get(TOKEN_ENV, "")
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       trust_remote_code=args.trust_remote_code).eval()
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    server = make_server(model, tok, args.model, args.host, args.port, token=token)
    host, port = server.server_address[:2]
    auth = "bearer token required" if token else \
        f"UNAUTHENTICATED: anyone who reaches {host}:{port} can use it; set --token"
    print(f"hopd serve-teacher: {args.model} on http://{host}:{port} (POST /v1/completions "
          f"with prompt_logprobs, POST /tokenize; {auth}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _exists(path: str) -> bool:
    """Path.exists, False for a text no file can have (too long, NUL bytes)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def _split_config(args: argparse.Namespace) -> None:
    """`hopd sft key=value` has no config file: the first positional is an override."""
    if args.config and "=" in args.config and not _exists(args.config):
        args.overrides = [args.config, *args.overrides]
        args.config = None


def _cmd_config_show(args: argparse.Namespace) -> int:
    """Every key of a distill config (nested as section.key), its value and its meaning."""
    from hopd.config import describe_fields
    from hopd.distill_config import DistillConfig, load_config

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides \
        else DistillConfig()
    rows = describe_fields(cfg)
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    for key, value, meaning in rows:
        print(f"{key} = {value}".ljust(width) + f"# {meaning}")
    return 0


def _model_dir(path: str) -> str:
    """A run folder stands for its final model (RUN/model)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return str(p / "model")
    return path


def _signal_status(signum: int) -> int:
    """The conventional exit status of a run stopped by a signal (SIGTERM: 143, SIGINT: 130)."""
    if signum:
        print(f"hopd: stopped by signal {signum}; the run was saved, continue it with --resume",
              file=sys.stderr)
        return 128 + signum
    return 0


def _check_device(device: str) -> str:
    """The device to use: `auto` is a GPU when there is one (every command's default)."""
    import torch

    from hopd.distill_config import resolve_device

    device = resolve_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    if not (device.startswith("cuda") or device in ("cpu", "mps")):
        raise ConfigError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


def _run_flags(p: argparse.ArgumentParser, resume_help: str) -> None:
    """--resume / --overwrite / --quiet, shared by the commands that write run folders."""
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only a folder hopd made)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _config_and_out(p: argparse.ArgumentParser, config_help: str, out_help: str,
                    required: bool = True) -> None:
    """CONFIG, --out, --overwrite and --quiet, shared by sft and distill."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("--out", required=required, help=out_help)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only a folder hopd made)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="run several horizon strategies and report")
    c.add_argument("config", nargs="?", help="base distill YAML (default: built-in defaults)")
    c.add_argument("--out", required=True, help="comparison folder")
    c.add_argument("--strategies", default="",
                   help="comma list from opd,popd,topd10,topd25,adaptive,topd10_tb,sft,kd "
                   "(default: opd,popd,topd10,topd25); NAME@LR pins a strategy's learning rate")
    c.add_argument("--lrs", default="",
                   help="learning-rate grid, e.g. 3e-4,1e-3,3e-3: every strategy at every rate; "
                   "the report picks each one's rate on the val half and reports the test half")
    c.add_argument("--seeds", default="0", help="comma list of seeds (default 0)")
    c.add_argument("--steps", type=int, default=0, help="budget: optimizer steps per run")
    c.add_argument("--seconds", type=float, default=0, help="budget: training seconds per run")
    c.add_argument("--tokens", type=int, default=0, help="budget: sampled tokens per run")
    c.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (default 1); several small runs "
                   "share a GPU well; on CPUs give each threads=1")
    _run_flags(c, "skip finished runs, resume the others")
    c.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    c.set_defaults(func=_cmd_compare)


def _add_serve_teacher(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("serve-teacher", help="serve a teacher's log-probs over HTTP")
    t.add_argument("model", help="checkpoint path or testbed:teacher")
    t.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only; 0.0.0.0 for other "
                   "machines, then set --token)")
    t.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    t.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    t.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    t.add_argument("--token", default="",
                   help="require 'Authorization: Bearer TOKEN' (or set HOPD_TEACHER_TOKEN; "
                   "the client reads the same variable)")
    t.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped in the model folder")
    t.set_defaults(func=_cmd_serve_teacher)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a model at the full response budget")
    e.add_argument("--model", required=True,
                   help="checkpoint folder, a run folder (its final model), a .gguf file, "
                   "smollm2:135m-instruct, or testbed:teacher|student|student-fork")
    e.add_argument("--task", default="chain:default",
                   help="chain:default|hard|tiny, chat:prompts, or a JSONL file (its held-out "
                   "split is used)")
    e.add_argument("--eval-data", default="", help="a JSONL file used whole as the eval set")
    e.add_argument("--n", type=int, default=500, help="held-out problems (default 500)")
    e.add_argument("--split", default="test", choices=["test", "val", "eval"],
                   help="held-out half: test (default), val, or eval (both halves)")
    e.add_argument("--samples", type=int, default=1, help="1: greedy; k > 1: k samples each")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    e.add_argument("--budget", type=int, default=0, help="response budget L (0: task default)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    e.add_argument("--show", type=int, default=0, help="keep N example responses in the output")
    e.add_argument("--teacher", default="",
                   help="a teacher that scores the held-out reverse KL and its NLL of the answers")
    e.add_argument("--kl-n", type=int, default=64,
                   help="prompts the teacher scores (default 64; needs --teacher)")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped in the model folder (off: such a folder fails)")
    e.add_argument("--out", help="write the JSON result here")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    e.add_argument("--no-cache", action="store_true",
                   help="evaluate even when the same weights and settings were evaluated before "
                        "(the cache: $HOPD_CACHE_DIR/evals, default ~/.cache/hopd)")
    e.set_defaults(func=_cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    from hopd import __version__

    p = argparse.ArgumentParser(prog="hopd", description="On-policy distillation with rollout-"
                                "horizon control (full OPD, progressive POPD, truncated TOPD).")
    p.add_argument("--version", action="version", version=f"hopd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    cs = sub.add_parser("config", help="show every distill setting with its meaning")
    cs_sub = cs.add_subparsers(dest="action", required=True)
    show = cs_sub.add_parser("show", help="every key (section.key), its value and its meaning")
    show.add_argument("config", nargs="?", help="a YAML config (default: the built-in defaults)")
    show.add_argument("overrides", nargs="*", help="key=value overrides")
    show.set_defaults(func=_cmd_config_show)

    s = sub.add_parser("sft", help="supervised training on worked solutions")
    _config_and_out(s, "YAML config (optional)", "output checkpoint folder")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.set_defaults(func=_cmd_sft)

    d = sub.add_parser("distill", help="on-policy distillation with a horizon schedule")
    _config_and_out(d, "YAML config, e.g. configs/popd.yaml", "run folder", required=False)
    d.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue a run: --resume RUN alone continues RUN with its own "
                   "config.yaml; with --out, the run in --out")
    d.add_argument("--force-config", action="store_true",
                   help="with --resume: accept config changes that make it a different run")
    d.add_argument("overrides", nargs="*",
                   help="key=value overrides by dotted path (horizon.kind=truncated, optim.lr=1e-4;"
                   " aliases: steps=max_steps, lr=optim.lr, H=horizon.tokens)")
    d.set_defaults(func=_cmd_distill)

    _add_compare(sub)
    r = sub.add_parser("report", help="plots and report.md from run folders")
    r.add_argument("runs", nargs="+", help="run folders, or folders that contain them")
    r.add_argument("--out", help="output folder (default: the first folder given)")
    r.set_defaults(func=_cmd_report)

    m = sub.add_parser("demo", help="the built-in OPD vs POPD vs TOPD comparison on the testbed")
    m.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes)")
    m.add_argument("--regime", default="spread", choices=["spread", "fork"],
                   help="spread (default): the student's mistakes are spread along the "
                   "solution; fork: success is decided by its first token")
    m.add_argument("--out", default="",
                   help="output folder (default runs/demo[-fork][-quick])")
    m.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N (default auto: a GPU when there is one)")
    _run_flags(m, "skip finished runs")
    m.set_defaults(func=_cmd_demo)

    _add_serve_teacher(sub)
    _add_eval(sub)
    add_model_tools(sub)
    return p




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (argparse stops collecting
    # positionals at the first option): gather any that are left over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from hopd.config import DiskFull, is_disk_full

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:  # the user's input: one line, no traceback
        print(f"hopd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:
        print(f"hopd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if is_disk_full(e):
            print(f"hopd {args.command}: error: no space left on the device ({e.filename or e})"
                  "; free space, then continue with --resume", file=sys.stderr)
            return 1
        if isinstance(e, PermissionError) or e.errno == errno.EROFS:  # the environment's
            print(f"hopd {args.command}: error: cannot write {e.filename or ''} ({e.strerror})"
                  "; make the folder writable or choose another --out (checkpoints already "
                  "written are intact: continue with --resume)", file=sys.stderr)
            return 1
        raise
    except RuntimeError as e:
        from hopd.distill_config import TrainingStopped

        if not isinstance(e, TrainingStopped):
            raise
        print(f"hopd {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"hopd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
