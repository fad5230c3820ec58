"""Streaming BASE I/O for ``transplant``: memory bounded by the embeddings, not the model.

Boundary: this module reads a BASE checkpoint (a safetensors directory, one file or sharded
with an index, or a ``.gguf`` file) without loading it, and writes the transplanted model
shard by shard. It knows nothing about how the new embedding rows are computed.

:func:`load_base` returns BASE's own transformers class built on the meta device, with only
the input embeddings and the lm_head read into memory (names from the architecture: the
meta model's ``get_input_embeddings`` / ``get_output_embeddings``, no table per family).
``transplant`` resizes and fills those like any model; the model's ``save_pretrained`` then
writes config.json and generation_config.json as transformers does, and every other tensor
is copied from BASE's files in bounded chunks (``copy_file_range``), dtype and bytes
unchanged, into shards of at most ``max_shard_size`` (transformers' splitting), with a
``model.safetensors.index.json`` when there is more than one. GGUF tensors are dequantized
one at a time with transformers' own name map and tensor processors.

What cannot be streamed (custom code, a checkpoint whose embedding tensor we cannot name,
GGUF architectures whose tensors transformers merges or splits) falls back to loading the
whole model, and says so once on stderr.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import shutil
import struct
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokensurgeon import modelio, progress, validate
from tokensurgeon.errors import UsageError

# safetensors dtype codes of the torch dtypes we write.
TORCH_TO_SAFETENSORS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
SAFETENSORS_TO_TORCH = {v: k for k, v in TORCH_TO_SAFETENSORS.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
            "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
COPY_CHUNK = 64 << 20  # bytes per copy_file_range / read call
DISK_MARGIN = 64 << 20  # free space kept beyond the bytes we write
# GGUF tensor processors that map one GGUF tensor to one HF tensor (others merge experts).
_ONE_TO_ONE_GGUF = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor"}


@dataclass
class StoredTensor:
    """One tensor of BASE: where its bytes are, or how to produce it.

    Attributes:
        name: the key it is stored (and written) under.
        dtype: safetensors dtype code.
        shape: its shape.
        path, offset: for safetensors, the file and absolute byte offset of its data.
        make: for GGUF, a function returning the dequantized float32 tensor.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path | None = None
    offset: int = 0
    make: object = None

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """BASE's stored tensors in order, and which keys hold the embedding and lm_head."""

    label: str
    tensors: list[StoredTensor]
    embed_key: str
    head_key: str | None  # None when tied
    dropped: list[str] = field(default_factory=list)  # tied lm_head copies: not written
    force_dtype: torch.dtype | None = None  # cast every float tensor (explicit --dtype)
    untie_name: str | None = None  # where a tied lm_head goes if the caller unties it
    max_shard_size: int | str = "50GB"


class CannotStream(Exception):
    """BASE can be transplanted, but not streamed: fall back to loading it whole."""


def _header(path: Path) -> tuple[dict, int]:
    """(tensor entries, absolute offset of the data section) of a safetensors file, checked
    by :func:`validate.safetensors_header` (which proves the data section ends the file)."""
    header = validate.safetensors_header(path, "re-download or re-save the model")
    data_bytes = max((e["data_offsets"][1] for e in header.values()), default=0)
    return header, path.stat().st_size - data_bytes


def _shard_files(directory: Path) -> list[Path]:
    """The shards transformers would load: the index's, else model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (directory / shard).is_file():
                raise UsageError(f"{directory} is missing the shard {shard} that {index.name} "
                                 "names; re-download or re-save the model")
        return [directory / s for s in shards]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise CannotStream("no model.safetensors or model.safetensors.index.json")


def _key_for(name: str, keys) -> str | None:
    # Checkpoints may omit or add a base-model prefix ("model."), as modelio accepts.
    for key in (name, name.split(".", 1)[-1], "model." + name):
        if key in keys:
            return key
    return None


def _skeleton(config, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _param_names(model) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # a tied weight keeps its first (embedding) name
    return names


def _embedding_names(model) -> tuple[str, str | None]:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or (
            head is not None and not isinstance(head, torch.nn.Linear)):
        raise CannotStream("its embeddings are not an embedding table and a linear lm_head")
    names = _param_names(model)
    tied = head is None or head.weight is emb.weight
    return names[id(emb.weight)], (None if tied else names[id(head.weight)])


def _safetensors_checkpoint(ref: modelio.ModelRef, skeleton) -> Checkpoint:
    entries: dict[str, StoredTensor] = {}
    for shard in _shard_files(ref.directory):
        header, data_start = _header(shard)
        for key, e in header.items():
            if e["dtype"] not in ITEMSIZE:
                raise CannotStream(f"tensor {key} has dtype {e['dtype']}")
            entries[key] = StoredTensor(key, e["dtype"], tuple(e["shape"]), shard,
                                        data_start + e["data_offsets"][0])
    embed_name, head_name = _embedding_names(skeleton)
    embed_key = _key_for(embed_name, entries)
    head_key = _key_for(head_name, entries) if head_name else None
    if embed_key is None or (head_name and head_key is None):
        raise CannotStream("its embedding / lm_head tensor names are not in the checkpoint")
    dropped = []
    if head_name is None:
        # A tied lm_head stored anyway: save_pretrained would not write it either.
        emb = skeleton.get_input_embeddings().weight
        for n, p in skeleton.named_parameters(remove_duplicate=False):
            key = _key_for(n, entries) if p is emb and n != embed_name else None
            if key is not None and key != embed_key:
                dropped.append(key)
    return Checkpoint(ref.label, _in_model_order(entries, skeleton, dropped), embed_key,
                      head_key, dropped)


def _in_model_order(entries: dict[str, StoredTensor], skeleton, dropped) -> list[StoredTensor]:
    """Tensors in the model's state_dict order (as save_pretrained shards them), then the rest."""
    order = {}
    for i, name in enumerate(skeleton.state_dict()):
        key = _key_for(name, entries)
        if key is not None:
            order.setdefault(key, i)
    stored = [t for t in entries.values() if t.name not in dropped]
    return sorted(stored, key=lambda t: order.get(t.name, len(order)))


def _gguf_checkpoint(ref: modelio.ModelRef, skeleton) -> Checkpoint:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    path = ref.directory / ref.gguf_file
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    reader = GGUFReader(str(path))
    field_ = reader.fields["general.architecture"]
    architecture = bytes(field_.parts[field_.data[0]]).decode()
    processor_cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_cls.__name__ not in _ONE_TO_ONE_GGUF:
        raise CannotStream(f"transformers converts {architecture} GGUF tensors jointly")
    processor = processor_cls(config=parsed.get("config", {}))
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    entries: dict[str, StoredTensor] = {}
    for tensor in reader.tensors:
        name = tensor.name  # one-to-one processors keep GGUF names
        if name not in mapping:
            continue
        hf_name = mapping[name]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))

        def make(tensor=tensor, name=name):
            weights = dequantize(tensor.data, tensor.tensor_type)
            weights = processor.process(weights=weights, name=name, tensor_key_mapping=mapping,
                                        parsed_parameters=parsed).weights
            out = torch.from_numpy(np.copy(weights)).float()
            # The file stays memory-mapped; drop the pages read so far so that they do not
            # add up in RSS over a large GGUF (they are re-read from the page cache if needed).
            mapped = getattr(reader.data, "_mmap", None)
            if mapped is not None and hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_DONTNEED)
            return out

        if hf_name in shapes and shapes[hf_name] != shape:
            raise UsageError(f"{ref.label}: {name} has shape {list(shape)} but the GGUF's "
                             f"config implies {list(shapes[hf_name])}; re-convert the model")
        entries[hf_name] = StoredTensor(hf_name, "F32", shape, make=make)
    embed_name, head_name = _embedding_names(skeleton)
    if embed_name not in entries or (head_name and head_name not in entries):
        raise CannotStream("its embedding / lm_head tensors are not in the GGUF file")
    return Checkpoint(ref.label, _in_model_order(entries, skeleton, []), embed_name, head_name)


def _read(tensor: StoredTensor) -> torch.Tensor:
    if tensor.make is not None:
        return tensor.make()
    from safetensors import safe_open

    with safe_open(str(tensor.path), framework="pt") as f:
        return f.get_tensor(tensor.name)


ROW_BLOCK_BYTES = 32 << 20  # bytes of rows read, cast or checked at a time


class DiskMatrix:
    """A 2-D tensor [V, H] in a safetensors file whose rows are read only when asked for.

    Rows are read with plain file reads into new tensors (memory the caller owns and frees),
    not through a memory map, so no page of the file stays counted in this process's RSS.

    Attributes:
        shape: torch.Size([V, H]); dtype: the stored torch dtype.
    """

    def __init__(self, stored: StoredTensor):
        if len(stored.shape) != 2 or stored.dtype not in FLOAT_CODES or stored.path is None:
            raise CannotStream(f"{stored.name} is not a 2-D float tensor in a safetensors file")
        self.stored = stored
        self.shape = torch.Size(stored.shape)
        self.dtype = SAFETENSORS_TO_TORCH[stored.dtype]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` [stop - start, H] in the stored dtype."""
        out = torch.empty(max(0, stop - start), self.shape[1], dtype=self.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        row_bytes = self.shape[1] * ITEMSIZE[self.stored.dtype]
        with self.stored.path.open("rb", buffering=0) as f:
            f.seek(self.stored.offset + start * row_bytes)
            while view:
                n = f.readinto(view)
                if not n:
                    raise UsageError(f"{self.stored.path} ended early; re-download or re-save "
                                     "the model")
                view = view[n:]
        return out


def rows_per_block(matrix) -> int:
    """Rows of ``matrix`` [V, H] (a tensor or :class:`DiskMatrix`) in one float32 block of
    about :data:`ROW_BLOCK_BYTES`."""
    return max(1, ROW_BLOCK_BYTES // (4 * max(1, matrix.shape[1])))


def row_blocks(matrix):
    """Yield (start, rows [n, H] in the stored dtype) over every row of ``matrix`` (a tensor or
    :class:`DiskMatrix`), a block of :func:`rows_per_block` rows at a time."""
    step = rows_per_block(matrix)
    for start in range(0, matrix.shape[0], step):
        stop = min(start + step, matrix.shape[0])
        yield start, (matrix.rows(start, stop) if isinstance(matrix, DiskMatrix)
                      else matrix.detach()[start:stop].cpu())


def gather(matrix, ids: torch.Tensor) -> torch.Tensor:
    """``matrix[ids]`` as a new float32 tensor [len(ids), H], for a tensor or a
    :class:`DiskMatrix` (read a block of rows at a time: each needed block once)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if not isinstance(matrix, DiskMatrix):
        return matrix.detach()[ids].float().cpu()
    out = torch.empty(ids.numel(), matrix.shape[1], dtype=torch.float32)
    if not ids.numel():
        return out
    if int(ids.min()) < 0 or int(ids.max()) >= matrix.shape[0]:
        raise IndexError(f"row ids outside [0, {matrix.shape[0]})")
    order = ids.argsort()
    wanted = ids[order]
    step = rows_per_block(matrix)
    pos = 0
    while pos < wanted.numel():
        start = int(wanted[pos])
        end = int(torch.searchsorted(wanted, torch.tensor([start + step]))[0])
        stop = int(wanted[end - 1]) + 1
        block = matrix.rows(start, stop)
        out[order[pos:end]] = block[wanted[pos:end] - start].float()
        del block
        pos = end
    return out


class Rows:
    """Rows ``ids`` of ``matrix`` (a tensor or :class:`DiskMatrix`) [len(ids), H], gathered as
    float32 only when indexed (``rows[a:b]``) or converted (``rows.to(...)``, ``rows.float()``,
    the whole of them), so that a method reading them a batch at a time never holds them all.
    Any other tensor use (``rows.mean(0)``, ``torch.cat([rows, ...])``) gathers them all first,
    so a method written for tensors works unchanged (it only loses the saving).
    """

    def __init__(self, matrix, ids: torch.Tensor):
        self.matrix = matrix
        self.ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        self.shape = torch.Size((self.ids.numel(), matrix.shape[1]))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return gather(self.matrix, self.ids[index])

    def float(self) -> torch.Tensor:
        return gather(self.matrix, self.ids)

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.float().to(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("matrix", "ids"):
            raise AttributeError(name)
        return getattr(self.float(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def whole(x):
            if isinstance(x, (list, tuple)):
                return type(x)(whole(y) for y in x)
            return x.float() if isinstance(x, Rows) else x

        args = tuple(whole(a) for a in args)
        kwargs = {k: whole(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


def embedding_matrices(ref: modelio.ModelRef, trust_remote_code: bool = False):
    """A model's (input embeddings [V, H], lm_head [V, H] or None when tied), unread.

    For a safetensors directory they are :class:`DiskMatrix` objects (nothing read yet);
    otherwise (GGUF, names we cannot find) the float32 tensors of
    :func:`modelio.load_embeddings`.
    """
    if ref.gguf_file is None:
        config = modelio.load_config(ref, trust_remote_code)
        modelio.check_causal_lm(ref, config)
        try:
            skeleton = _skeleton(config, trust_remote_code)
            entries: dict[str, StoredTensor] = {}
            for shard in _shard_files(ref.directory):
                header, data_start = _header(shard)
                for key, e in header.items():
                    if e["dtype"] in ITEMSIZE:
                        entries[key] = StoredTensor(key, e["dtype"], tuple(e["shape"]), shard,
                                                    data_start + e["data_offsets"][0])
            embed_name, head_name = _embedding_names(skeleton)
            embed_key = _key_for(embed_name, entries)
            head_key = _key_for(head_name, entries) if head_name else None
            if embed_key is not None and (head_name is None or head_key is not None):
                return (DiskMatrix(entries[embed_key]),
                        DiskMatrix(entries[head_key]) if head_key else None)
        except CannotStream:
            pass
    embed, head, _ = modelio.load_embeddings(ref, trust_remote_code)
    return embed, head


def load_base(ref: modelio.ModelRef, trust_remote_code: bool = False, stream: bool = True,
              dtype: str | None = None, max_shard_size: int | str = "50GB",
              out_dir: str | Path | None = None):
    """BASE as a model whose embeddings are real and whose other weights stay on disk.

    Args:
        dtype: an explicit output dtype name (e.g. "bfloat16"); None keeps BASE's stored
            dtypes (a GGUF's dequantized float32, as the in-memory path writes).
        max_shard_size: largest output shard, as transformers' ``save_pretrained`` takes it.
        out_dir: where OUT will be written; its disk must hold about BASE's size.

    Returns:
        a transformers model; when streamed, every parameter except the input embeddings
        and the lm_head is on the meta device and ``save_pretrained`` streams the weights.
        Falls back to :func:`modelio.load_model` (with one line on stderr) when BASE cannot
        be streamed.
    """
    if stream:
        max_shard_size = shard_size_bytes(max_shard_size)
        try:
            return _streamed_model(ref, trust_remote_code, dtype, max_shard_size, out_dir)
        except CannotStream as why:
            print(f"tokensurgeon: cannot stream {ref.label} ({why}); loading the whole model "
                  "into memory instead", file=sys.stderr)
    return modelio.load_model(ref, trust_remote_code=trust_remote_code)


@contextmanager
def body_on(base, embed: torch.Tensor):
    """BASE's transformer body reading ``embed`` [V, H] as its input embeddings.

    For a streamed BASE (body on the meta device) a float32 copy of the body is built
    (embedding table of one row, then ``embed`` in float32) and its tensors read from BASE's files, so
    memory grows by the body alone; for a loaded BASE its own embedding weight is swapped
    for ``embed`` and restored afterwards (a tied lm_head keeps the old weight). The
    lm_head is not part of the body and is left as it is. Yields the model.
    """
    emb = base.get_input_embeddings()
    checkpoint: Checkpoint | None = getattr(base, "streamed_from", None)
    if checkpoint is None:
        old = emb.weight
        emb.weight = torch.nn.Parameter(embed, requires_grad=False)
        try:
            yield base
        finally:
            emb.weight = old
        return
    import copy

    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(base.config)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "vocab_size", None):
            pad = getattr(cfg, "pad_token_id", None)
            cfg.vocab_size = (pad if isinstance(pad, int) else 0) + 1
    with no_init_weights():
        body = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    body.get_input_embeddings().weight = torch.nn.Parameter(embed.float(), requires_grad=False)
    stored = {t.name: t for t in checkpoint.tensors}
    skip = {checkpoint.embed_key, checkpoint.head_key}
    decoder = body.get_decoder()
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if param is body.get_input_embeddings().weight:
                continue
            key = next((k for k in (_key_for(f"model.{name}", stored), _key_for(name, stored))
                        if k is not None and k not in skip), None)
            if key is None:
                raise CannotStream(f"no stored tensor for {name}")
            param.copy_(_read(stored[key]))
    body.eval()
    try:
        yield body
    finally:
        del body


def shard_size_bytes(size: int | str) -> int:
    """``--max-shard-size`` as transformers reads it ("5GB", "200MB", or bytes)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(size, int) or str(size).isdigit():
        value = int(size)
    else:
        try:
            value = parse_size_to_int(str(size))
        except ValueError:
            raise UsageError(f"--max-shard-size {size!r} is not a size; write it like 5GB, "
                             "200MB or 1000000 (bytes)") from None
    if value < 1:
        raise UsageError(f"--max-shard-size must be positive (got {size!r})")
    return value


def _streamed_model(ref, trust_remote_code, dtype, max_shard_size, out_dir):
    config = modelio.load_config(ref, trust_remote_code)
    if getattr(config, "auto_map", None):
        raise CannotStream("it uses custom model code")
    modelio.check_causal_lm(ref, config)
    skeleton = _skeleton(config, trust_remote_code)
    checkpoint = (_gguf_checkpoint(ref, skeleton) if ref.gguf_file
                  else _safetensors_checkpoint(ref, skeleton))
    if out_dir is not None:
        _check_free_space(Path(out_dir), sum(t.nbytes for t in checkpoint.tensors))
    checkpoint.max_shard_size = max_shard_size
    if dtype is not None:
        checkpoint.force_dtype = getattr(torch, dtype)
    stored = {t.name: t for t in checkpoint.tensors}
    if checkpoint.head_key is None and skeleton.get_output_embeddings() is not None:
        head_weight = skeleton.get_output_embeddings().weight
        checkpoint.untie_name = next(
            (n for n, p in skeleton.named_parameters(remove_duplicate=False)
             if p is head_weight and n != _embedding_names(skeleton)[0]), None)
    emb = skeleton.get_input_embeddings()
    emb.weight = torch.nn.Parameter(_read(stored[checkpoint.embed_key]), requires_grad=False)
    if checkpoint.head_key is None:
        skeleton.tie_weights()
    else:
        skeleton.get_output_embeddings().weight = torch.nn.Parameter(
            _read(stored[checkpoint.head_key]), requires_grad=False)
    # config.dtype is what transplant saves as under --dtype auto: BASE's stored dtype.
    stored_dtype = emb.weight.dtype
    config.dtype = stored_dtype
    for sub in ("text_config",):
        if getattr(config, sub, None) is not None:
            getattr(config, sub).dtype = stored_dtype
    gen = ref.directory / "generation_config.json"
    if ref.gguf_file is None and gen.is_file():
        from transformers import GenerationConfig

        skeleton.generation_config = GenerationConfig.from_pretrained(ref.directory)
    skeleton.eval()
    skeleton.streamed_from = checkpoint
    skeleton.save_pretrained = types.MethodType(_save_streamed, skeleton)
    return skeleton


def _check_free_space(out: Path, needed: int) -> None:
    where = out.expanduser().resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed + DISK_MARGIN:
        raise UsageError(f"not enough disk space for OUT: {needed / 1e9:.2f} GB to write, "
                         f"{free / 1e9:.2f} GB free at {where}; free some space or choose "
                         "another OUT")


def _save_streamed(model, save_directory, **kwargs) -> None:
    """``save_pretrained`` for a streamed model: configs as transformers writes them, then
    the weights shard by shard."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    out = Path(save_directory)
    checkpoint: Checkpoint = model.streamed_from
    # Configs (and generation config) exactly as transformers writes them; no weights.
    type(model).save_pretrained(model, out, state_dict={})
    embed = model.get_input_embeddings().weight.detach()
    head_module = model.get_output_embeddings()
    # The caller may have untied a tied BASE: its new lm_head is one more computed tensor.
    untied = (checkpoint.head_key is None and head_module is not None
              and head_module.weight is not model.get_input_embeddings().weight)
    head_key = checkpoint.untie_name if untied else checkpoint.head_key
    head = None if head_key is None else head_module.weight.detach()
    items: list[tuple[StoredTensor, torch.Tensor | None]] = []
    for t in checkpoint.tensors:
        if t.name == checkpoint.embed_key:
            items.append((_computed(t.name, embed), embed))
        elif t.name == head_key:
            items.append((_computed(t.name, head), head))
        else:
            dtype = t.dtype
            if checkpoint.force_dtype is not None and t.dtype in FLOAT_CODES:
                dtype = TORCH_TO_SAFETENSORS[checkpoint.force_dtype]
            items.append((StoredTensor(t.name, dtype, t.shape, t.path, t.offset, t.make), None))
    if untied:
        if head_key is None:
            raise UsageError(f"{checkpoint.label}: cannot name the untied lm_head; "
                             "pass --no-stream")
        items.append((_computed(head_key, head), head))
    by_name = {s.name: (s, value) for s, value in items}
    split = split_state_dict_into_shards_factory(
        {s.name: s for s, _ in items}, get_storage_size=lambda s: s.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=kwargs.get("max_shard_size", checkpoint.max_shard_size))
    total = sum(s.nbytes for s, _ in items)
    _check_free_space(out, total)
    sources = {t.name: t for t in checkpoint.tensors}
    written = 0
    progress.get().report(0, total >> 20, "MB")
    try:
        for filename, names in split.filename_to_tensors.items():
            _write_shard(out / filename, [by_name[n] for n in names], sources)
            written += sum(by_name[n][0].nbytes for n in names)
            progress.get().report(written >> 20, total >> 20, "MB")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UsageError(f"the disk filled up while writing {out} ({exc.strerror}); free "
                             "some space and run again (nothing was written to OUT)") from None
        raise UsageError(f"cannot write {out} ({exc.strerror}); check the disk and run "
                         "again (nothing was written to OUT)") from None
    if split.is_sharded:
        params = sum(math.prod(s.shape) for s, _ in items)
        index = {"metadata": {"total_parameters": params, "total_size": total},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _computed(name: str, tensor: torch.Tensor) -> StoredTensor:
    return StoredTensor(name, TORCH_TO_SAFETENSORS[tensor.dtype], tuple(tensor.shape))


def _write_shard(path: Path, items: list[tuple[StoredTensor, torch.Tensor | None]],
                 sources: dict[str, StoredTensor]) -> None:
    """Write one safetensors file, one tensor at a time (copied bytes never enter Python
    objects larger than :data:`COPY_CHUNK`)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s, _ in items:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with path.open("wb", buffering=0) as f:
        _write_all(f, struct.pack("<Q", len(raw)) + raw)
        for s, value in items:
            src = sources.get(s.name)
            if value is None and src is not None and src.make is None and src.dtype == s.dtype:
                _copy_range(src.path, src.offset, s.nbytes, f)
                continue
            if value is None:
                value = _read(src)
            value = value.to(SAFETENSORS_TO_TORCH[s.dtype]).contiguous()
            if tuple(value.shape) != s.shape:
                raise UsageError(f"{s.name} has shape {list(value.shape)} where "
                                 f"{list(s.shape)} was expected; re-convert BASE")
            _write_all(f, value.reshape(-1).view(torch.uint8).numpy().data)
            del value
        os.fsync(f.fileno())


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


def _copy_range(src: Path, offset: int, count: int, dst) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to the open file ``dst``."""
    with src.open("rb") as f:
        done = 0
        try:
            while done < count:
                n = os.copy_file_range(f.fileno(), dst.fileno(), min(COPY_CHUNK, count - done),
                                       offset + done)
                if n == 0:
                    raise UsageError(f"{src} ended early; re-download or re-save BASE")
                done += n
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        f.seek(offset + done)
        while done < count:
            chunk = f.read(min(COPY_CHUNK, count - done))
            if not chunk:
                raise UsageError(f"{src} ended early; re-download or re-save BASE")
            _write_all(dst, chunk)
            done += len(chunk)
