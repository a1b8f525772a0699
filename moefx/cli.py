"""The moefx command line: compress a transformers checkpoint, export it, render its report, run the demo.

Exit codes: 0 success, 2 bad input (a one-line message says what and how to fix it), 1 an internal error
(the traceback is shown with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from moefx.config import (
    METHOD_NAMES,
    ROUTER_MODES,
    SELECTIONS,
    SIMILARITIES,
    SPARSE_AXES,
    SPARSE_SCORES,
    SVD_MODES,
    CompressionConfig,
)
from moefx.config import REFITS as REFIT_MODES
from moefx.errors import CalibrationError, CheckpointError, ConfigError, MoefxError, MoefxWarning, first_line

EXPORT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors follow the CLI's convention: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"moefx: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str) -> int | float:
    """An integer if ``text`` is one (a count), else a float (a fraction)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None


def _positive(text: str) -> int:
    """A positive integer."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _layer(text: str) -> int | str:
    """An MoE block index, or its name."""
    return int(text) if text.isdigit() else text


# ---------------------------------------------------------------- moefx compress


def _read_texts(path: Path) -> list[str]:
    """The texts of a calibration or evaluation file: the whole file, or each line's "text" for ``.jsonl``."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read {path}: {first_line(exc)}") from None
    if path.suffix != ".jsonl":
        return [content]
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(record["text"])
        except (json.JSONDecodeError, TypeError, KeyError):
            raise CalibrationError(f'{path}:{number}: expected a JSON object with a "text" field') from None
        if not isinstance(texts[-1], str):
            raise CalibrationError(f'{path}:{number}: the "text" field is not a string')
    return texts


def _tokenizer(model_dir: Path) -> Callable[[str], list[int]]:
    """The model's own tokenizer (``AutoTokenizer``), or its character vocabulary (``vocab.json`` of type char,
    as the benchmark fixtures have)."""
    vocab_file = model_dir / "vocab.json"
    if vocab_file.is_file():
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            vocab = None  # not ours to judge: a tokenizer's own vocab.json is read by AutoTokenizer below
        if isinstance(vocab, dict) and vocab.get("type") == "char":
            from moefx.demo import benchmark_modules

            chars = benchmark_modules()[0].CharVocab(vocab["chars"])
            return lambda text: _encode_chars(chars, text, vocab_file)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError or TypeError for a missing tokenizer
        raise CalibrationError(
            f"{model_dir} has no tokenizer that transformers can load ({first_line(exc, 120)}): save the model's "
            f"tokenizer there (tokenizer.save_pretrained) or give a character vocab.json"
        ) from None
    return lambda text: tokenizer(text, verbose=False)["input_ids"]


def _encode_chars(vocab: Any, text: str, vocab_file: Path) -> list[int]:
    try:
        return vocab.encode(text).tolist()
    except KeyError as exc:
        raise CalibrationError(f"the text has the character {exc.args[0]!r}, which {vocab_file} lacks") from None


def _windows(ids: list[int], count: int, seq_len: int, source: Path) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens spread evenly over ``ids`` (fewer, with a warning, if short)."""
    available = len(ids) // seq_len
    if available == 0:
        raise CalibrationError(f"{source} holds {len(ids)} tokens, fewer than --seq-len {seq_len}: give more text")
    if available < count:
        warnings.warn(
            f"{source} holds only {available} sequences of {seq_len} tokens; using them all", MoefxWarning, stacklevel=2
        )
        count = available
    starts = torch.linspace(0, available - 1, count).round().long() * seq_len
    return torch.tensor(ids)[starts[:, None] + torch.arange(seq_len)]


def _text_batches(
    texts: list[str], source: Path, encode: Callable[[str], list[int]], count: int, args: argparse.Namespace
) -> list[dict[str, torch.Tensor]]:
    """``count`` sequences of the texts (joined by blank lines), tokenised, in batches of --batch-size."""
    windows = _windows(encode("\n\n".join(texts)), count, args.seq_len, source)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(args.batch_size)]


def _load_model(model_dir: Path) -> torch.nn.Module:
    """A causal LM from a local transformers checkpoint directory, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # OSError, ValueError or KeyError, depending on what is wrong with config.json
        raise CheckpointError(f"cannot read the transformers config in {model_dir}: {first_line(exc)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, local_files_only=True, dtype="auto")
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise CheckpointError(
                f"{model_dir} holds a {config.model_type} model, which is not a causal language model "
                f"(AutoModelForCausalLM cannot load it)"
            ) from None
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot load the weights in {model_dir}: {first_line(exc)}") from None
    return model.eval()


def _config(args: argparse.Namespace) -> CompressionConfig:
    """The compression options given on the command line (validated)."""
    names = [f for f in CompressionConfig.__dataclass_fields__ if hasattr(args, f)]
    return CompressionConfig(**{name: getattr(args, name) for name in names})


def _compress(args: argparse.Namespace) -> None:
    """Compress a transformers checkpoint; write the checkpoint, report.json, report.md and plots to --out."""
    import moefx
    from moefx.api import QualityCheck
    from moefx.objective import mean_next_token_loss
    from moefx.report import overview, write_report

    config = _config(args)
    model_dir, out = Path(args.model_dir), Path(args.out)
    if out.exists():
        raise CheckpointError(f"{out} already exists: choose a new output directory")
    if not out.absolute().parent.is_dir():
        raise CheckpointError(f"the directory {out.absolute().parent} does not exist: create it first")
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} is not a transformers checkpoint: it has no config.json")
    calib_file, eval_file = Path(args.calib), None if args.eval is None else Path(args.eval)
    calib_texts = _read_texts(calib_file)  # before the slow steps, as are all checks of the input
    eval_texts = None if eval_file is None else _read_texts(eval_file)
    encode = _tokenizer(model_dir)
    calib = _text_batches(calib_texts, calib_file, encode, args.num_calib_seqs, args)
    if _torchrun_processes() > 1 and not config.sequential:
        raise ConfigError("under torchrun, moefx compress runs layer by layer: add --sequential")
    if config.sequential:
        _compress_streaming(model_dir, calib, out, config, eval_file)
        return
    model = _load_model(model_dir)
    evaluation = None if eval_file is None else _text_batches(eval_texts, eval_file, encode, args.num_eval_seqs, args)
    vocab_size = model.get_input_embeddings().num_embeddings
    for batches in filter(None, (calib, evaluation)):
        top = max(int(b["input_ids"].max()) for b in batches)
        if top >= vocab_size:
            raise CalibrationError(f"the tokenizer gave token id {top} but the model has {vocab_size} embeddings")
    before = None if evaluation is None else mean_next_token_loss(model, evaluation)
    config.inplace = True  # the original is not needed afterwards
    compressed = moefx.compile(model, calib, config)
    report = compressed.moefx_report
    if evaluation is not None:
        metric = f"next-token loss (nats/token) on {eval_file.name}"
        report.quality = QualityCheck(metric, before, mean_next_token_loss(compressed, evaluation))
    # build the whole directory beside its destination, then rename: no partial OUT_DIR on failure
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.absolute().parent))
    try:
        built = moefx.save(compressed, staging / out.name, {k: v[:2] for k, v in calib[0].items()})
        write_report(report, built)
        os.rename(built, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(overview(report))
    print(f"wrote {out}: the compressed checkpoint (moefx.load), report.json, report.md and plots")


def _compress_streaming(
    model_dir: Path, calib: list[dict[str, torch.Tensor]], out: Path, config: CompressionConfig, eval_file: Path | None
) -> None:
    """``compress --sequential``: stream the checkpoint layer by layer (one layer in memory at a time)."""
    from moefx.distributed import rank_and_size
    from moefx.report import overview, write_report
    from moefx.stream import compress_checkpoint, output_format

    if eval_file is not None:
        raise ConfigError("--eval needs the whole model in memory, which --sequential avoids: evaluate the output")

    distributed = _torchrun_processes() > 1
    if distributed:  # one process per rank; the statistics are summed over gloo (CPU tensors)
        torch.distributed.init_process_group("gloo")
    prints = rank_and_size()[0] == 0

    def told(i: int, count: int, result: Any) -> None:
        if prints:
            print(f"layer {i + 1}/{count} done in {result.seconds:.1f} s", flush=True)

    try:
        report = compress_checkpoint(model_dir, calib, out, config, progress=told)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if not prints:
        return
    write_report(report, out)
    print(overview(report))
    if output_format(out) == "transformers":
        written = "a plain transformers checkpoint in shards (AutoModelForCausalLM.from_pretrained loads it)"
    else:
        written = "a moefx checkpoint in shards (moefx.load loads it; compress with --router pruned for transformers)"
    print(f"wrote {out}: {written}, report.json, report.md and plots")


def _torchrun_processes() -> int:
    """The number of processes torchrun started for this job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------- moefx export, report, demo


def _export(args: argparse.Namespace) -> None:
    """Export a checkpoint written by `moefx compress` (or moefx.save) to ONNX, TorchScript or pt2."""
    import moefx.export

    directory = Path(args.directory)
    path = Path(args.path) if args.path is not None else directory / EXPORT_FILES[args.format]
    if path.exists():
        raise CheckpointError(f"{path} already exists: remove it or give another --path")
    model = moefx.export.load(directory)
    onnx_only = {"fused": args.fused, "expert_bits": args.expert_bits, "kv_cache": args.kv_cache,
                 "int8_activations": args.int8_activations, "width_splits": args.width_splits}  # fmt: skip
    if args.format != "onnx" and any(v not in (False, None) for v in onnx_only.values()):
        raise ConfigError(
            f"--fused, --expert-bits, --int8-activations, --width-splits and --kv-cache apply to --format onnx only, "
            f"not {args.format}"
        )
    if args.width_splits is not None and (not args.fused or args.expert_bits is not None):
        raise ConfigError("--width-splits cuts the float experts of fused nodes: pass it with --fused, without "
                          "--expert-bits")  # fmt: skip
    options = {k: v for k, v in onnx_only.items() if v is not None} if args.format == "onnx" else {}
    getattr(moefx.export, args.format)(model, path, moefx.export.checkpoint_inputs(directory), verify=args.verify,
                                       **options)  # fmt: skip
    size = moefx.export.file_bytes(path) if args.format == "onnx" else path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.2f} MB)")
    if args.format == "onnx":
        from moefx.export.onnx import describe_lowering

        print(describe_lowering(moefx.export.fused_blocks(path)))


def _report(args: argparse.Namespace) -> None:
    """Re-render report.md and the plots from a directory's report.json and print the overview."""
    from moefx.export.checkpoint import load_report
    from moefx.report import overview, write_report

    directory = Path(args.directory)
    report = load_report(directory)
    path = write_report(report, directory)
    print(overview(report))
    print(f"wrote {path} and its plots")


def _demo(args: argparse.Namespace) -> None:
    """Compress the repository's LM fixture, export original and compressed to ONNX, print the comparison.

    Runs on one thread unless --threads is given: the fixture is small, and on a busy two-core machine a
    second thread mostly waits for the first.
    """
    from moefx.demo import run_demo, table

    start = time.perf_counter()
    rows = run_demo(
        args.method or [CompressionConfig().method],
        experts=args.experts,
        router=args.router,
        num_calib_seqs=args.num_calib_seqs,
        num_val_seqs=args.num_val_seqs,
        seq_len=args.seq_len,
        runs=args.runs,
        progress=args.progress,
    )
    print()
    print(table(rows))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} thread(s)")


# ---------------------------------------------------------------- the parser


def _add_compression_options(parser: argparse.ArgumentParser) -> None:
    """The CompressionConfig options (see its docstring for details); defaults are CompressionConfig's."""
    d = CompressionConfig()
    own = "default: the method's own choice"
    add = parser.add_argument
    add(
        "--experts",
        type=_number,
        default=d.experts,
        help="experts kept per MoE layer on average: a fraction in (0, 1] or an integer count; each layer keeps "
        "at least its top-k (default: %(default)s)",
    )
    add(
        "--method",
        choices=METHOD_NAMES,
        default=d.method,
        help="merge-refit: M-SMoE merging plus a closed-form refit of each merged expert; m-smoe: the paper's "
        "frequency-dominant grouping and frequency-weighted merging; mc-smoe: m-smoe, then each merged "
        "expert compressed to low-rank plus sparse; baselines: prune-frequency, average, hc-smoe, reap "
        "(default: %(default)s)",
    )
    add(
        "--router",
        choices=ROUTER_MODES,
        default=d.router,
        help="exact: keep the router and map each chosen expert to its group; pruned: one router output per "
        "kept expert, fitted by least squares (default: %(default)s)",
    )
    add(
        "--adaptive",
        action=argparse.BooleanOptionalAction,
        default=d.adaptive,
        help=f"allocate kept experts across layers by global scores (the paper), or keep the same count in "
        f"every layer ({own})",
    )
    add(
        "--align",
        action=argparse.BooleanOptionalAction,
        default=d.align,
        help=f"permutation-align group members to their dominant expert before merging ({own})",
    )
    add(
        "--similarity",
        choices=SIMILARITIES,
        default=d.similarity,
        help="how non-dominant experts choose their group (default: %(default)s)",
    )
    add("--selection", choices=SELECTIONS, default=d.selection, help=f"how experts are ranked for keeping ({own})")
    add(
        "--refit",
        choices=REFIT_MODES,
        default=d.refit,
        help=f"closed-form refit of merged experts on the calibration tokens: none, out (output projection), "
        f"in+out (also the input projections) or units (in+out, then hidden units chosen among the members') ({own})",
    )
    add("--ridge", type=float, default=d.ridge, help="relative ridge of the refit solves (default: %(default)s)")
    add(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=d.sequential,
        help="compress one decoder layer at a time, streamed from the checkpoint's shards, each calibrated on the "
        "compressed layers before it: memory stays at about one layer (default: off)",
    )
    add(
        "--skip-layers",
        type=_layer,
        nargs="+",
        default=list(d.skip_layers),
        metavar="LAYER",
        help="MoE blocks left unchanged, by index among the MoE blocks or by name (default: none)",
    )
    add(
        "--rank",
        type=_number,
        default=d.rank,
        help="mc-smoe: rank of each merged linear's low-rank part, an integer or a fraction of min(out, in) "
        "(default: %(default)s)",
    )
    add(
        "--sparse-keep",
        type=float,
        default=d.sparse_keep,
        help="mc-smoe: fraction of the sparse residual's columns (or rows) kept (default: %(default)s)",
    )
    add(
        "--svd",
        choices=SVD_MODES,
        default=d.svd,
        help="mc-smoe: activation-aware (whitened by calibration inputs) or plain SVD (default: %(default)s)",
    )
    add(
        "--sparse-axis",
        choices=SPARSE_AXES,
        default=d.sparse_axis,
        help="mc-smoe: prune the residual's columns (input features, the paper) or rows (default: %(default)s)",
    )
    add(
        "--sparse-score",
        choices=SPARSE_SCORES,
        default=d.sparse_score,
        help="mc-smoe: rank residual slices by activation energy or by the paper's |s * dL/ds| on the "
        "calibration text's next-token loss (default: %(default)s)",
    )
    add(
        "--stable-ranks",
        action="store_true",
        help="record each expert's stable rank before and after merging in the report, an eigensolve per "
        "matrix (default: off)",
    )
    add("--seed", type=int, default=d.seed, help="seed for anything random (default: %(default)s)")


def _add_common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--debug and --threads, accepted before or after the command (the command's copy must not reset them)."""
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="show the full traceback and every library warning on errors (default: off)",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=default(None),
        help="torch threads, and ONNX Runtime's in the demo (default: 1 for the demo, else PyTorch's choice, one "
        "per core; on a busy machine fewer threads are often much faster)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``moefx`` argument parser."""
    parser = _Parser(prog="moefx", description=__doc__.splitlines()[0])
    _add_common_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compress = commands.add_parser(
        "compress", help="compress a local transformers checkpoint", description=_compress.__doc__
    )
    compress.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="a local transformers causal-LM checkpoint (config.json and weights) with its "
        "tokenizer, or a character vocab.json",
    )
    compress.add_argument(
        "--calib",
        required=True,
        metavar="FILE",
        help='calibration text: plain text, or JSONL with a "text" field per line if the name '
        "ends in .jsonl (required)",
    )
    compress.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="directory to create for the compressed checkpoint, report.json, report.md and the "
        "plots; it must not exist (required)",
    )
    _add_compression_options(compress)
    compress.add_argument(
        "--num-calib-seqs",
        type=_positive,
        default=256,
        help="calibration sequences, spread evenly over the file (default: %(default)s)",
    )
    compress.add_argument("--seq-len", type=_positive, default=128, help="tokens per sequence (default: %(default)s)")
    compress.add_argument(
        "--batch-size", type=_positive, default=8, help="sequences per calibration batch (default: %(default)s)"
    )
    compress.add_argument(
        "--eval",
        metavar="FILE",
        default=None,
        help="held-out text (same formats as --calib) on which to report the next-token loss "
        "before and after compression (default: no quality check)",
    )
    compress.add_argument(
        "--num-eval-seqs", type=_positive, default=64, help="sequences of --eval to evaluate (default: %(default)s)"
    )
    compress.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars for calibration and merging (default: on)",
    )
    compress.set_defaults(run=_compress)

    export = commands.add_parser(
        "export", help="export a compressed checkpoint to ONNX, TorchScript or pt2", description=_export.__doc__
    )
    export.add_argument("directory", metavar="OUT_DIR", help="a directory written by `moefx compress` or moefx.save")
    export.add_argument(
        "--format",
        choices=sorted(EXPORT_FILES),
        required=True,
        help="onnx (run by ONNX Runtime), torchscript, or pt2 (torch.export) (required)",
    )
    export.add_argument(
        "--path",
        metavar="FILE",
        default=None,
        help="where to write the artifact (default: OUT_DIR/"
        + ", ".join(f"{v} for {k}" for k, v in EXPORT_FILES.items())
        + ")",
    )
    export.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the artifact on inputs of another shape than it was traced on and compare with PyTorch (default: on)",
    )
    export.add_argument(
        "--fused",
        action="store_true",
        help="onnx only: each MoE block whose experts ONNX Runtime's com.microsoft.MoE operator can run becomes "
        "one such node (default: the portable form, faster on ONNX Runtime's CPU provider)",
    )
    export.add_argument(
        "--width-splits",
        type=int,
        default=None,
        help="onnx only, with --fused: cut each float expert's hidden units into this many of the operator's "
        "experts, so that as many threads share every expert's work evenly (default: 2)",
    )
    export.add_argument(
        "--expert-bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="onnx only: experts as 8- or 4-bit weights in ONNX Runtime's com.microsoft.QMoE operator (default: float)",
    )
    export.add_argument(
        "--int8-activations",
        action="store_true",
        help="onnx only, with --expert-bits 4: ONNX Runtime's CPU kernel rounds the experts' inputs to int8 too and "
        "multiplies in integers, faster; the parity check then compares with eager rounding them alike (default: "
        "float activations)",
    )
    export.add_argument(
        "--kv-cache",
        action="store_true",
        help="onnx only: a causal LM's decoding step with its key/value cache (past_key_values.* in, present.* "
        "out), for moefx.export.OnnxGenerator (default: full-sequence logits)",
    )
    export.set_defaults(run=_export)

    report = commands.add_parser(
        "report", help="re-render report.md and the plots from report.json", description=_report.__doc__
    )
    report.add_argument("directory", metavar="OUT_DIR", help="a directory written by `moefx compress`")
    report.set_defaults(run=_report)

    defaults = CompressionConfig()
    demo = commands.add_parser(
        "demo", help="compress the repository's LM fixture end to end and compare", description=_demo.__doc__
    )
    demo.add_argument(
        "--method",
        choices=METHOD_NAMES,
        action="append",
        default=None,
        help=f"compression method; repeat to compare several (default: {defaults.method})",
    )
    demo.add_argument(
        "--experts",
        type=_number,
        default=0.5,
        help="experts kept per MoE layer, as for compress (default: %(default)s)",
    )
    demo.add_argument(
        "--router",
        choices=ROUTER_MODES,
        default=defaults.router,
        help="router mode, as for compress (default: %(default)s)",
    )
    demo.add_argument(
        "--num-calib-seqs",
        type=_positive,
        default=64,
        help="calibration sequences from the training split (default: %(default)s)",
    )
    demo.add_argument(
        "--num-val-seqs", type=_positive, default=32, help="validation sequences for the loss (default: %(default)s)"
    )
    demo.add_argument("--seq-len", type=_positive, default=128, help="characters per sequence (default: %(default)s)")
    demo.add_argument(
        "--runs",
        type=_positive,
        default=10,
        help="timed ONNX Runtime runs per model; the median is reported (default: %(default)s)",
    )
    demo.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bars for calibration and merging (default: on)",
    )
    demo.set_defaults(run=_demo)

    for sub in (compress, export, report, demo):
        _add_common_options(sub, top=False)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"moefx: warning: {message}", file=sys.stderr)


def _quiet_transformers() -> None:
    """transformers' info messages and weight-loading bars say nothing a CLI user can act on."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    threads = torch.get_num_threads()
    if args.threads is not None or args.command == "demo":
        torch.set_num_threads(args.threads or 1)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")
                warnings.simplefilter("always", MoefxWarning)
                warnings.showwarning = _show_warning
                _quiet_transformers()
            args.run(args)
    except MoefxError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"moefx: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an internal error: say so in one line unless asked for the traceback
        if args.debug:
            raise
        print(
            f"moefx: internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was (main is also called in-process)
    return 0
