"""``tokensurgeon eval``: bits per UTF-8 byte of a causal LM on a text file.

Boundary: text in, one number out. Bits per byte divides the model's total negative
log-likelihood by the bytes it covered, so models with different tokenizers are compared
on the same footing. Log-probabilities are computed in chunks along the sequence from the
final hidden states, so a 262k-vocabulary model never holds [T, V] logits for a whole
sequence at once.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokensurgeon import conventions, modelio, progress, validate
from tokensurgeon.errors import UsageError
from tokensurgeon.logits import LOGIT_CHUNK, decoder_and_head, final_hidden_states, token_logprobs

BOS_MODES = ("auto", "always", "never")
# A default that loses more than this many bits per byte to the other BOS choice is reported.
BOS_WARN_MARGIN = 0.01


@dataclass
class EvalConfig:
    """Bits per UTF-8 byte of MODEL on TEXT (lower is better), with each segment encoded the
    way clients encode it: by the tokenizer's own defaults (a BOS only if it adds one)."""

    model: str = field(metadata={
        "positional": True, "help": "HF directory, .gguf file or builtin:NAME"})
    text: str = field(metadata={
        "positional": True,
        "help": "a .txt file, or .jsonl with a text field (text, answer, ...)"})
    field_name: str = field(default="auto", metadata={
        "help": "JSONL field to read; auto takes text, then answer, then content"})
    encoding: str = field(default="utf-8", metadata={
        "help": "text encoding of TEXT (a Python codec name, e.g. latin-1)"})
    max_bytes: int = field(default=200_000, metadata={
        "help": "evaluate only the first this many bytes of the text (0 = all)"})
    segment_chars: int = field(default=2000, metadata={
        "help": "split the text into segments of about this many characters at line ends"})
    batch_size: int = field(default=4, metadata={"help": "segments per forward pass"})
    logit_chunk: int = field(default=LOGIT_CHUNK, metadata={
        "help": "positions per lm_head chunk (bounds memory for large vocabularies)"})
    bos: str = field(default="auto", metadata={
        "choices": BOS_MODES,
        "help": "auto: encode as the tokenizer does by default (what clients get); always: put "
                "the BOS (or EOS) token before every segment by hand; never: no prefix token"})
    bos_probe_bytes: int = field(default=8000, metadata={
        "help": "with --bos auto, also score this many bytes with and without a BOS and warn "
                "when the tokenizer's default is much worse (0 skips the check)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code (off: safer)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def validate(self) -> None:
        for name in ("segment_chars", "batch_size", "logit_chunk"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_bytes < 0:
            raise UsageError("--max-bytes must be >= 0")
        if self.bos_probe_bytes < 0:
            raise UsageError("--bos-probe-bytes must be >= 0")
        if self.bos not in BOS_MODES:
            raise UsageError(f"--bos must be one of {', '.join(BOS_MODES)} (got {self.bos!r})")


def jsonl_rows(path: Path, encoding: str = "utf-8", option: str | None = None):
    """Yield (line number, parsed object) for each non-blank line of a JSONL file."""
    for n, line in enumerate(validate.read_text(path, encoding, option).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, validate.check_unicode(json.loads(line), f"{path}:{n}")
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{n} is not valid JSON; fix the line") from None


def read_documents(path: str | Path, field_name: str = "auto", encoding: str = "utf-8",
                   option: str | None = None) -> list[str]:
    """Documents of a .txt file (the whole file) or a .jsonl file (one per line)."""
    p = validate.check_input_file(path, "pass a .txt or .jsonl file")
    if p.suffix == ".jsonl":
        docs = []
        for n, row in jsonl_rows(p, encoding, option):
            keys = ["text", "answer", "content"] if field_name == "auto" else [field_name]
            value = next((row[k] for k in keys if isinstance(row, dict) and k in row), None)
            if not isinstance(value, str):
                raise UsageError(f"{path}:{n} has no string field {keys}; pass --field-name")
            docs.append(value)
        return docs
    return [validate.read_text(p, encoding, option)]


def first_bytes(docs: list[str], max_bytes: int) -> list[str]:
    """The documents cut to their first ``max_bytes`` UTF-8 bytes in all (0 keeps
    everything). The cut falls at the last line end within the budget, or, when the kept
    part of the document has none, at the last whole character."""
    if not max_bytes:
        return list(docs)
    kept: list[str] = []
    left = max_bytes
    for doc in docs:
        raw = doc.encode("utf-8")
        if len(raw) <= left:
            kept.append(doc)
            left -= len(raw)
            continue
        head = raw[:left]
        line_end = head.rfind(b"\n")
        head = head[: line_end + 1] if line_end >= 0 else head
        kept.append(head.decode("utf-8", errors="ignore"))  # drops a split last character
        break
    return kept


def segment_text(docs: list[str], segment_chars: int, max_bytes: int) -> list[str]:
    """Split documents into segments of about ``segment_chars`` characters at line ends,
    keeping the first ``max_bytes`` UTF-8 bytes (0 keeps everything)."""
    segments: list[str] = []
    used = 0
    for doc in docs:
        current = ""
        for line in doc.splitlines(keepends=True):
            if current and len(current) + len(line) > segment_chars:
                segments.append(current)
                current = ""
            current += line
        if current.strip():
            segments.append(current)
    kept: list[str] = []
    for seg in segments:
        size = len(seg.encode("utf-8"))
        if max_bytes and used + size > max_bytes:
            break
        kept.append(seg)
        used += size
    return kept


def chunked_token_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """log p(labels) from final hidden states, computing logits ``chunk`` positions at a time.

    Args:
        hidden: [B, T, H] final hidden states (already normed).
        head: the lm_head, mapping H -> V.
        labels: [B, T] the token to score at each position.
        chunk: positions per lm_head call.
        softcap: optional final-logit soft-capping (Gemma-2 style).
    Returns:
        [B, T] float32 log-probabilities.
    """
    return token_logprobs(hidden, head, labels, chunk, softcap)


def model_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] final hidden states of a causal LM (before the lm_head)."""
    return final_hidden_states(model, input_ids, attention_mask)


def encode_segment(tokenizer, text: str, bos: str) -> tuple[list[int], int, int]:
    """Encode one segment for scoring.

    Returns (ids, first scored position, scored bytes). Tokens from the first scored position
    on are predicted and their bytes counted. ``auto`` keeps what ``tokenizer(text)`` adds
    before the text as context and drops what it adds after; ``always`` puts the BOS (or EOS)
    token first by hand; ``never`` adds nothing. Without a prefix the first token has no
    context: it is not scored and its bytes are not counted.
    """
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos == "auto":
        prefix, _ = conventions.framing(tokenizer, text)
    elif bos == "always":
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if first is None:
            raise UsageError("the tokenizer has neither a BOS nor an EOS token to start segments "
                             "with; use --bos never")
        prefix = [first]
    else:
        prefix = []
    n_bytes = len(text.encode("utf-8"))
    if prefix or not body:
        return prefix + body, len(prefix), n_bytes if body else 0
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first_end = enc["offset_mapping"][0][1] if enc.get("offset_mapping") else 0
    return body, 1, n_bytes - len(text[:first_end].encode("utf-8"))


def pad_batch(batch: Sequence[tuple[list[int], list[bool]]],
              pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, L], attention mask [B, L], scored [B, L] bool) of ``batch``:
    (token ids, per-token "score this prediction" flags) pairs; L is the longest."""
    width = max(len(x) for x, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for r, (x, flags) in enumerate(batch):
        ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, : len(x)] = 1
        scored[r, : len(x)] = torch.tensor(flags, dtype=torch.bool)
    return ids, mask, scored


def bits_per_byte(model, tokenizer, segments: list[str], batch_size: int = EvalConfig.batch_size,
                  logit_chunk: int = EvalConfig.logit_chunk, report: Callable | None = None,
                  bos: str = EvalConfig.bos) -> dict:
    """Total NLL of every scored token of every segment, in bits per scored UTF-8 byte.

    ``bos`` is ``auto`` (the tokenizer's own defaults, as clients encode), ``always`` (a BOS
    by hand, this project's convention before clients were measured) or ``never``; see
    :func:`encode_segment`. ``report(done, total, unit)`` gets the tokens scored so far (by
    default the running phase's counter, see :mod:`tokensurgeon.progress`).
    """
    if bos not in BOS_MODES:
        raise UsageError(f"bos must be one of {BOS_MODES} (got {bos!r})")
    device = next(model.parameters()).device
    _, head, softcap = decoder_and_head(model)
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    encoded = []
    for s in segments:
        ids, start, n_bytes = encode_segment(tokenizer, s, bos)
        encoded.append((ids, start))
        total_bytes += n_bytes
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    report = report or progress.get().report
    to_score, scored_tokens = sum(len(x) for x, _ in encoded), 0
    report(0, to_score, "tok")
    # no_grad, not inference_mode: a model sharded by FSDP gathers its weights into buffers
    # that training reuses, which must not become inference tensors.
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[s : s + batch_size]]
            ids, mask, scored = pad_batch(
                [(x, [i >= max(start, 1) for i in range(len(x))]) for x, start in batch], pad)
            ids, mask = ids.to(device), mask.to(device)
            hidden = model_hidden_states(model, ids, mask)
            logp = chunked_token_logprobs(hidden[:, :-1], head, ids[:, 1:], logit_chunk, softcap)
            valid = scored[:, 1:].to(device)
            total_nll -= float(logp[valid].double().sum())
            total_tokens += int(valid.sum())
            scored_tokens += sum(len(x) for x, _ in batch)
            report(scored_tokens, to_score, "tok")
    return {
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
        "nll_nats": total_nll,
        "bytes": total_bytes,
        "tokens": total_tokens,
        "bytes_per_token": total_bytes / max(total_tokens, 1),
        "bos": bos,
    }


def bos_check(model, tokenizer, segments: list[str], probe_bytes: int, **kwargs) -> dict:
    """Score the first ``probe_bytes`` of ``segments`` as the tokenizer does by default, with a
    BOS by hand and without one. ``warning`` is set when the default is worse than the best
    of the two by more than :data:`BOS_WARN_MARGIN` bits per byte."""
    probe, used = [], 0
    for seg in segments:
        if probe and used + len(seg.encode("utf-8")) > probe_bytes:
            break
        probe.append(seg)
        used += len(seg.encode("utf-8"))
    report = progress.get().report  # one count over the three passes

    def part(i: int) -> Callable:
        return lambda done, total, unit: report(i * total + done, len(BOS_MODES) * total, unit)

    scores = {mode: bits_per_byte(model, tokenizer, probe, bos=mode, report=part(i),
                                  **kwargs)["bits_per_byte"] for i, mode in enumerate(BOS_MODES)}
    best = min(scores["always"], scores["never"])
    out = {"probe_bytes": used, **{f"bpb_{m}": round(v, 4) for m, v in scores.items()}}
    if scores["auto"] > best + BOS_WARN_MARGIN:
        better = "with a BOS" if scores["always"] < scores["never"] else "without a BOS"
        out["warning"] = (f"this model scores {scores['auto'] - best:.3f} bits/byte better "
                          f"{better} than with its tokenizer's defaults ({scores['auto']:.3f} vs "
                          f"{best:.3f} on {used} bytes): clients using the tokenizer as saved get "
                          "the worse figure; re-save it with the base model's BOS convention")
    return out


def evaluate(cfg: EvalConfig) -> dict:
    cfg.validate()
    device = modelio.resolve_device(cfg.device)
    docs = read_documents(cfg.text, cfg.field_name, cfg.encoding, "--encoding")
    # --max-bytes cuts the text itself (not whole segments), so any budget keeps some text.
    segments = segment_text(first_bytes(docs, cfg.max_bytes), cfg.segment_chars, 0)
    if not segments:
        if any(d.strip() for d in docs):
            raise UsageError(f"the first {cfg.max_bytes} bytes of {cfg.text} are blank; raise "
                             "--max-bytes (0 = all)")
        raise UsageError(f"{cfg.text} holds no text to evaluate; pass a non-empty file")
    progress.get().start("load")
    ref = modelio.resolve(cfg.model)
    tokenizer = modelio.load_tokenizer(ref, cfg.trust_remote_code)
    model = modelio.load_model(ref, device=device, trust_remote_code=cfg.trust_remote_code)
    progress.get().start("evaluate")
    result = bits_per_byte(model, tokenizer, segments, cfg.batch_size, cfg.logit_chunk,
                           bos=cfg.bos)
    result.update({"model": ref.label, "text": str(cfg.text), "segments": len(segments),
                   "adds_bos": bool(conventions.framing(tokenizer)[0])})
    if cfg.bos == "auto" and cfg.bos_probe_bytes:
        progress.get().start("bos check")
        check = bos_check(model, tokenizer, segments, cfg.bos_probe_bytes,
                          batch_size=cfg.batch_size, logit_chunk=cfg.logit_chunk)
        result["bos_check"] = check
        if "warning" in check:
            print(f"warning: {check['warning']}", file=sys.stderr)
    return result
