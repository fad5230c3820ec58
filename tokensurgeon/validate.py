"""Input validation: find a broken model directory or text file before any work starts.

Boundary: reads file headers and small JSON files only (never weights, never a tokenizer's
model); every failure is a :class:`UsageError` whose one line names the file, the real
fault and its fix. ``modelio`` calls these checks when it resolves and loads a model, and
``eval`` / ``distill`` read text through :func:`read_text`.

Checks:
- :func:`check_model_dir`: ``config.json`` is a JSON object with ``model_type``; every
  ``*.safetensors`` file's header is JSON, its tensors' byte ranges match their dtype and
  shape, and together they cover the file exactly (a truncated download fails here); the
  shards an index names exist; a tokenizer file is present and, when JSON, parses.
- :func:`check_weight_shapes`: every tensor whose name the model's architecture knows has
  the shape ``config.json`` implies (e.g. ``embed_tokens`` is [vocab_size, hidden_size]).
- :func:`check_input_file`: an input path is a file (not missing, not a folder).
- :func:`read_text`: a text file decoded strictly; a bad byte is reported with its offset.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tokensurgeon.errors import UsageError

# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Any one of these makes a directory's tokenizer loadable by transformers.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.txt")
# Header sizes beyond this are not a real safetensors file (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"line {exc.lineno} column {exc.colno}: {exc.msg}"


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """Parse a small JSON file that must hold an object, or raise a one-line UsageError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror}); {fix}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a {what}: byte {exc.start} is not UTF-8; {fix}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a {what}: invalid JSON ({_json_error(exc)}); {fix}"
                         ) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a {what}: it holds a JSON {type(data).__name__}, not "
                         f"an object; {fix}")
    return data


def check_json_ends(path: Path, what: str, fix: str, full_below: int = 1 << 21) -> None:
    """Parse a JSON object file when small; a large one (a 262k-token tokenizer.json is
    ~30 MB, seconds to parse) only has to begin with ``{`` and end with ``}``, which a
    truncated or foreign file does not."""
    if path.stat().st_size < full_below:
        read_json_object(path, what, fix)
        return
    with path.open("rb") as f:
        head = f.read(64).lstrip()
        f.seek(-64, 2)
        tail = f.read().rstrip()
    if not head.startswith(b"{") or not tail.endswith(b"}"):
        raise UsageError(f"{path} is not a {what}: not a JSON object (truncated?); {fix}")


def check_config_json(directory: Path, fix: str) -> dict:
    """The parsed ``config.json`` of a model directory; it must name its ``model_type``."""
    config = read_json_object(directory / "config.json", "model config",
                              fix)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise UsageError(f"{directory / 'config.json'} has no \"model_type\" (e.g. \"llama\"), so "
                         f"its architecture is unknown; {fix}")
    return config


def safetensors_header(path: Path, fix: str) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, checked against the file size.

    Returns:
        {tensor name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}}
    """
    size = path.stat().st_size
    if size < 8:
        raise UsageError(f"{path} is truncated ({size} bytes, less than a safetensors header); {fix}")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise UsageError(f"{path} is truncated or not safetensors: its header claims {n:,} "
                             f"bytes but the file holds {size:,}; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError  # noqa: TRY004 (caught just below: one message for both)
    except (UnicodeDecodeError, ValueError):
        raise UsageError(f"{path} has a corrupt safetensors header (not a JSON object); {fix}"
                         ) from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    end_max = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            itemsize = SAFETENSORS_DTYPES[dtype]
            numel = 1
            for d in shape:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}; "
                             f"{fix}") from None
        if end - begin != numel * itemsize:
            raise UsageError(f"{path}: tensor {name!r} is {dtype} {list(shape)} ({numel * itemsize:,} "
                             f"bytes) but its header gives it {end - begin:,} bytes; {fix}")
        end_max = max(end_max, end)
    if end_max > data_bytes:
        raise UsageError(f"{path} is truncated: its header needs {8 + n + end_max:,} bytes but the "
                         f"file holds {size:,}; {fix}")
    if end_max < data_bytes:
        raise UsageError(f"{path} has {data_bytes - end_max:,} bytes its header does not cover "
                         f"(a corrupt or concatenated file); {fix}")
    return header


def check_tokenizer_files(directory: Path, fix: str) -> None:
    """A model directory must carry a tokenizer; a ``tokenizer.json`` must parse."""
    present = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not present:
        raise UsageError(f"{directory} has no tokenizer (none of tokenizer.json, tokenizer.model, "
                         "vocab.json); copy the tokenizer files next to the model or run "
                         "tokenizer.save_pretrained(DIR)")
    if "tokenizer.json" in present:
        check_json_ends(directory / "tokenizer.json", "tokenizer file",
                        "re-save the tokenizer with tokenizer.save_pretrained(DIR)")
    if (directory / "tokenizer_config.json").is_file():
        read_json_object(directory / "tokenizer_config.json", "tokenizer config",
                         "re-save the tokenizer with tokenizer.save_pretrained(DIR)")


def model_dir_headers(directory: Path, fix: str) -> dict[str, tuple[Path, dict]]:
    """{tensor name: (shard, header entry)} over every safetensors shard of ``directory``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "safetensors index", fix).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise UsageError(f"{directory} is missing the shard {shard} that "
                                 f"{index.name} names; {fix}")
    headers: dict[str, tuple[Path, dict]] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        for name, entry in safetensors_header(shard, fix).items():
            headers[name] = (shard, entry)
    return headers


def check_model_dir(directory: Path, fix: str = "re-download or re-save the model") -> None:
    """Check a Hugging Face model directory's config, weights headers and tokenizer files."""
    config = check_config_json(directory, fix)
    headers = model_dir_headers(directory, fix)
    check_embedding_shape(config, headers, fix)
    check_tokenizer_files(directory, fix)


def check_embedding_shape(config: dict, headers: dict[str, tuple[Path, dict]], fix: str) -> None:
    """The input embedding table must be [vocab_size, hidden_size] of config.json (or of its
    ``text_config``); a cheap JSON-only check that runs before anything reads the config."""
    sizes = [(c.get("vocab_size"), c.get("hidden_size"))
             for c in (config, config.get("text_config") or {}) if isinstance(c, dict)]
    sizes = [s for s in sizes if all(isinstance(x, int) for x in s)]
    for name, (shard, entry) in headers.items():
        if name.endswith("embed_tokens.weight") and sizes:
            if tuple(entry["shape"]) not in sizes:
                vocab, hidden = sizes[-1]
                raise UsageError(
                    f"{shard}: {name} has shape {list(entry['shape'])} but config.json implies "
                    f"[{vocab}, {hidden}] (vocab_size, hidden_size); the weights and "
                    f"config.json do not belong together; {fix}")
            if entry["dtype"] not in FLOAT_DTYPES:
                raise UsageError(f"{shard}: {name} is stored as {entry['dtype']}, not a float "
                                 f"dtype; {fix}")


def check_weight_shapes(directory: Path, config, fix: str = "re-download or re-save the model",
                        trust_remote_code: bool = False) -> None:
    """Every stored tensor the architecture names has the shape and a dtype its config implies.

    Builds the architecture on the meta device (no memory) from ``config`` and compares
    parameter shapes with the safetensors headers, allowing the usual ``model.`` prefix
    differences. Floating parameters stored as integers are refused too.
    """
    import torch
    from transformers import AutoModelForCausalLM

    headers = model_dir_headers(directory, fix)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an architecture we cannot build is reported later
        return
    for pname, param in skeleton.named_parameters(remove_duplicate=False):
        for key in (pname, pname.split(".", 1)[-1], "model." + pname):
            if key in headers:
                shard, entry = headers[key]
                if list(entry["shape"]) != list(param.shape):
                    raise UsageError(
                        f"{shard}: {key} has shape {list(entry['shape'])} but config.json implies "
                        f"{list(param.shape)} (vocab_size, hidden_size, ...); the weights and "
                        f"config.json do not belong together; {fix}")
                if param.is_floating_point() and entry["dtype"] not in FLOAT_DTYPES:
                    raise UsageError(f"{shard}: {key} is stored as {entry['dtype']}, not a float "
                                     f"dtype; {fix}")
                break


def check_input_file(path: str | Path, fix: str) -> Path:
    """``path`` as a Path when it is a readable regular file; otherwise a one-line UsageError
    that names what it is instead (missing, a folder, a device) and ends with ``fix``."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{path} is a folder, not a file; {fix}")
    if not p.exists():
        raise UsageError(f"{path} does not exist; {fix}")
    if not p.is_file():
        raise UsageError(f"{path} is not a regular file; {fix}")
    return p


def read_text(path: str | Path, encoding: str = "utf-8", option: str | None = None) -> str:
    """The whole text of ``path``, decoded strictly.

    A byte that is not valid in ``encoding`` raises a one-line UsageError with its offset;
    ``option`` (e.g. ``"--encoding"``) is named as the way to read other encodings.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror}); pass a readable text file") from None
    try:
        return raw.decode(encoding)
    except LookupError:
        raise UsageError(f"unknown text encoding {encoding!r}; use a Python codec name such as "
                         "utf-8 or latin-1") from None
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        line = raw.count(b"\n", 0, exc.start) + 1
        binary = b"\x00" in raw[:8192]
        how = (f"pass {option} with its encoding (e.g. {option} latin-1) or convert it to UTF-8"
               if option else "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
        if binary:
            how = "pass a text file"
        kind = "binary, not text" if binary else f"not {encoding} text"
        raise UsageError(f"{path} is {kind}: byte 0x{bad} at offset {exc.start} (line {line}) "
                         f"cannot be decoded; {how}") from None


def check_gguf_file(path: Path) -> None:
    """A ``.gguf`` file must start with the GGUF magic and be longer than its fixed header."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror}); pass a readable .gguf file") from None
    if head[:4] != b"GGUF" or len(head) < 24:
        raise UsageError(f"{path} is not a GGUF file (no GGUF header, or truncated); "
                         "re-download it or pass an HF model directory")


def check_unicode(obj, where: str):
    """Return ``obj`` (a parsed JSON value) unchanged, or refuse a string in it that holds a
    lone surrogate (a ``\\ud800`` escape): it is not Unicode text, has no UTF-8 bytes, and
    tokenizers fail on it with a TypeError."""
    if isinstance(obj, str):
        for i, ch in enumerate(obj):
            if "\ud800" <= ch <= "\udfff":
                raise UsageError(f"{where} holds a lone surrogate \\u{ord(ch):04x} at character "
                                 f"{i}, which is not Unicode text; fix or drop that escape")
    elif isinstance(obj, dict):
        for value in obj.values():
            check_unicode(value, where)
    elif isinstance(obj, list):
        for value in obj:
            check_unicode(value, where)
    return obj
