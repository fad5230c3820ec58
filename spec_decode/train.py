"""``tokensurgeon spec train``: DistillSpec, one readable loop.

Boundary: data mixing and the loss; optimisation, checkpoints, resume, progress and JSONL
metrics come from :mod:`tokensurgeon.training` (shared with the ALM trainer).

Each step draws ``batch_size`` prompts and, per prompt, one data source by the lambda mix:
- on-policy (share ``--on-policy``, optionally ramped by ``--schedule linear``): the DRAFT
  continues the prompt, then the target scores that text;
- target-generated (share ``--target-generated``): the TARGET continues the prompt;
- fixed (the rest): the file's own continuation (GSM8K ``answer``).
Every source trains at most ``--max-new-tokens`` positions per prompt (fixed answers are cut
there too), so a step of any mix trains about the same number of positions.
The loss is the chosen divergence between the target's and the draft's next-token
distributions over the draft's vocabulary at ``--temperature``, averaged over continuation
positions: the full vocabulary, or for a reduced-head draft (``make-draft --head-tokens``)
its K tokens, with the target renormalised on them (the draft as it is served; see
:mod:`spec_decode.loss`). It is computed from both models' final hidden states a chunk of
positions at a time, so no [N, V] logits are kept (0.5 GB each at 512 positions of a 262k
vocabulary). Only the embedding and head rows the loss reaches train (the tokens of the
fixed text, the K head rows), as parameters of their own: the same draft as training the
whole matrices at weight decay 0, with the gradient and AdamW moments of those rows only
(:mod:`spec_decode.trainable_rows`; with weight decay, or generated text, whole matrices). ``--verify`` names the rule the draft will be verified with (vLLM's
``draft_sample_method``; see :mod:`spec_decode.speculative`):
- ``probabilistic``: drafts are sampled and accepted with probability 1 - TVD(p, q), so the
  loss compares p and q at the temperature;
- ``greedy`` (vLLM's default): the draft proposes argmax q, accepted with p(argmax q), so
  only argmax agreement matters: p is replaced by a one-hot on the target's argmax.
Every ``--eval-every`` steps it logs, on target continuations of held-out prompts, the exact
acceptance under each rule (``heldout_acceptance`` is 1 - TVD, ``heldout_greedy_acceptance``
is p(argmax q)), argmax agreement, and ``heldout_rule_acceptance``, the one ``--verify`` names.

``--target-cache DIR`` keeps the target's top-``--cache-top-k`` logits at every fixed-text
position on disk (one target pass, reused by every epoch, divergence and draft trained on the
same text with the same target; shards of :class:`tokensurgeon.teacher_cache.TeacherCache`). With
``--verify greedy`` the loss reads only the target's argmax, so the cached loss equals the
online one exactly; with ``--verify probabilistic`` p is renormalised over the top k, which
changes the loss (the tail's mass is dropped). Without ``--target-cache`` the target runs
online.

OUT, ``--resume``, checkpoints, metrics and the final save are :mod:`tokensurgeon.training`'s,
as for ``distill``: checkpoints and metrics.jsonl go to OUT as training runs, the finished
draft replaces OUT atomically, and ``--resume`` refuses options that differ from the
checkpointed run's. ``--grad-accum`` splits each process's prompts into micro-batches whose
summed loss equals the whole batch's (less memory, the same step).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spec_decode.divergences import DIVERGENCES, divergence_names
from spec_decode.draft import check_shared_vocabulary, head_for, record_head
from spec_decode.loss import chunked_acceptance, chunked_divergence, positions_per_chunk
from spec_decode.prompts import MAX_NEW_TOKENS, Example, chat_option, encode_prompt, read_examples
from spec_decode.reduced_head import CONFIG_KEY, HEAD_TOKENS, head_token_ids
from spec_decode.speculative import DRAFT_SAMPLE_METHODS
from spec_decode.trainable_rows import DraftRows, split_rows
from tokensurgeon import modelio, progress, training
from tokensurgeon.config import read_resolved_config
from tokensurgeon.errors import UsageError
from tokensurgeon.logits import (
    LOGIT_CHUNK,
    decoder_and_head,
    final_hidden_states,
    head_logits,
    map_logit_chunks,
)
from tokensurgeon.teacher_cache import TeacherCache, data_fingerprint, model_fingerprint

SOURCES = ("on_policy", "target", "fixed")


LABEL_SOURCES = ("auto", "target", "data")


@dataclass
class SpecTrainConfig(training.TrainingOptions):
    """Train DRAFT to imitate TARGET (DistillSpec): minimise a divergence between their
    next-token distributions at the decoding temperature, on a lambda mix of fixed text,
    target continuations and the draft's own (on-policy) continuations scored by TARGET.
    The defaults are the recipe measured best (docs/spec.md): fixed text (no on-policy
    samples), forward KL towards the target's argmax (T=0, --verify greedy: vLLM's default
    drafting rule)."""

    target: str = field(metadata={"positional": True, "help": "target model (HF directory)"})
    draft: str = field(metadata={
        "positional": True, "help": "draft model with TARGET's tokenizer (spec make-draft)"})
    data: str = field(default="", metadata={
        "help": ".jsonl with a question/prompt field (and answer for fixed data) or .txt"})
    out: str = field(default="out/spec-draft", metadata={
        "help": "output directory: the trained draft, checkpoints/, metrics.jsonl"})
    divergence: str = field(default="fkl", metadata={
        "choices": divergence_names, "help": "training divergence"})
    beta: float = field(default=0.5, metadata={"help": "JSD mixture weight, M = beta p + (1-beta) q"})
    on_policy: float = field(default=0.0, metadata={
        "help": "lambda: share of examples continued by the draft itself"})
    target_generated: float = field(default=0.0, metadata={
        "help": "share of examples continued by the target (the rest use the file's text)"})
    schedule: str = field(default="constant", metadata={
        "choices": ["constant", "linear"],
        "help": "constant lambda, or ramp the on-policy share linearly from 0 to lambda"})
    temperature: float = field(default=0.0, metadata={
        "help": "decoding temperature the draft is trained for (0 = greedy); also the "
                "sampling temperature of generated continuations"})
    labels: str = field(default="auto", metadata={
        "choices": list(LABEL_SOURCES),
        "help": "target: run the target for its logits at every position; data: the fixed "
                "text is the target's own greedy output (spec make-data), so each next token "
                "is the target's argmax: train on it without loading the target (fixed data, "
                "--verify greedy, --temperature 0 and a divergence of the argmax: fkl or tvd); "
                "auto: data when --data is spec make-data's greedy output of this TARGET "
                "and the other options allow it, else target"})
    verify: str = field(default="greedy", metadata={
        "choices": list(DRAFT_SAMPLE_METHODS),
        "help": "the rule the draft will be verified with (vLLM draft_sample_method): "
                "probabilistic trains the divergence at the temperature (acceptance 1 - TVD); "
                "greedy trains towards a one-hot on the target's argmax (acceptance p(argmax q))"})
    steps: int = training.own_default("steps", 200)
    lr: float = training.own_default("lr", 5e-4)  # it healed the cuts of docs/spec.md
    weight_decay: float = training.own_default("weight_decay", 0.0)
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={
        "help": "tokens per generated continuation; fixed answers are cut to it too"})
    max_length: int = field(default=384, metadata={"help": "truncate prompt+continuation to this"})
    num_examples: int = field(default=0, metadata={"help": "use the first N rows of --data (0 = all)"})
    heldout: int = field(default=16, metadata={
        "help": "rows at the end of --data held out for the acceptance estimate (0 = none)"})
    eval_every: int = field(default=25, metadata={"help": "steps between held-out estimates"})
    target_cache: str = field(default="", metadata={
        "help": "directory of the target's cached top-k logits on the fixed text, filled on "
                "first use and reused by later runs (exact with --verify greedy)"})
    cache_top_k: int = field(default=64, metadata={
        "help": "logits kept per position in --target-cache (greedy needs only 1)"})
    chat: bool = chat_option()
    head_tokens: int = field(default=HEAD_TOKENS, metadata={
        "help": "a DRAFT with the full output head gets a reduced one (FR-Spec, as make-draft "
                "--head-tokens): the K target tokens most frequent in --data's training rows "
                "plus every special and stop token, chosen before step 1 and saved with the "
                "draft; 0 keeps the full head. A draft that already has a reduced head keeps it"})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "recompute the draft's decoder layers in the backward pass instead of keeping "
                "their activations (1.3 GB less for SmolLM2's 30 layers at batch 8; more CPU)"})

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UsageError("no --data given; pass a .jsonl of prompts (GSM8K train works)")
        if not (0 <= self.on_policy <= 1 and 0 <= self.target_generated <= 1
                and self.on_policy + self.target_generated <= 1):
            raise UsageError("--on-policy and --target-generated must be in [0, 1] and sum to <= 1")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (got {self.temperature})")
        if self.verify == "greedy" and self.divergence == "rkl":
            raise UsageError("reverse KL to a one-hot target is infinite; with --verify greedy "
                             "use --divergence fkl, tvd or jsd")
        if not 0 < self.beta < 1:
            raise UsageError(f"--beta must be in (0, 1) (got {self.beta})")
        if self.head_tokens < 0:
            raise UsageError(f"--head-tokens {self.head_tokens}: give K >= 1, or 0 for the full head")
        for name in ("max_new_tokens", "max_length", "eval_every", "cache_top_k"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if self.labels == "data":
            needs = labels_from_data_needs(self)
            if needs:
                raise UsageError("--labels data reads the target's greedy choice from the text, "
                                 f"so it needs {', '.join(needs)}; or pass --labels target")


HEAD_SOURCES = {"draft": "the draft's own reduced head",
                "data": "the most frequent target tokens of --data with every special and stop token",
                "full": "the full vocabulary (--head-tokens 0, or K >= the vocabulary)"}


def labels_from_data_needs(cfg: SpecTrainConfig) -> list[str]:
    """The flags ``--labels data`` lacks in ``cfg`` (empty: the run may take its labels from
    the text)."""
    return [flag for flag, bad in (
        ("--on-policy 0 --target-generated 0", cfg.on_policy or cfg.target_generated),
        ("--verify greedy", cfg.verify != "greedy"),
        ("--temperature 0", cfg.temperature != 0),
        ("--divergence fkl or tvd",
         getattr(DIVERGENCES.get(cfg.divergence), "of_argmax", None) is None),
        ("no --target-cache", cfg.target_cache)) if bad]


def made_by(data: str) -> dict | None:
    """``spec make-data``'s resolved options when ``data`` is its output (OUT/data.jsonl with
    OUT/config.yaml and OUT/summary.json beside it), else None."""
    from spec_decode.target_data import DATA_FILE

    path = Path(data)
    if path.name != DATA_FILE or not (path.parent / "summary.json").is_file():
        return None
    made = read_resolved_config(path.parent)
    return made if "target" in made and "prompts" in made else None


def same_model(a: str, b: str) -> bool:
    """Whether two model arguments name the same model (equal text or the same resolved
    directory)."""
    if a == b:
        return True
    if a.startswith("builtin:") and b.startswith("builtin:"):
        return False
    try:
        return modelio.resolve(a).directory.resolve() == modelio.resolve(b).directory.resolve()
    except (UsageError, OSError):
        return False


def resolved_labels(cfg: SpecTrainConfig) -> tuple[str, str]:
    """(``target`` or ``data``, why) for ``cfg.labels``: ``auto`` takes the labels from the
    text when it is ``spec make-data``'s greedy output of this TARGET with the same chat
    setting and the run allows it (:func:`labels_from_data_needs`), else runs the target."""
    if cfg.labels != "auto":
        return cfg.labels, f"--labels {cfg.labels}"
    made = made_by(cfg.data)
    if made is None:
        return "target", "--data is not spec make-data output"
    if not same_model(str(made["target"]), cfg.target):
        return "target", f"--data was made by {made['target']}, not this target"
    if made.get("temperature", 0) != 0 or made.get("chat", True) != cfg.chat:
        return "target", "--data was sampled (T > 0) or made with another --chat setting"
    needs = labels_from_data_needs(cfg)
    if needs:
        return "target", f"labels from the text need {', '.join(needs)}"
    return "data", "--data is this target's greedy output (spec make-data)"


def on_policy_share(cfg: SpecTrainConfig, step: int) -> float:
    """lambda at ``step``: constant, or ramped linearly from 0 over the run."""
    if cfg.schedule == "linear":
        return cfg.on_policy * min(1.0, step / max(1, cfg.steps - 1))
    return cfg.on_policy


def pick_sources(rng: random.Random, n: int, on_policy: float, target_share: float) -> list[str]:
    out = []
    for _ in range(n):
        u = rng.random()
        out.append("on_policy" if u < on_policy else "target" if u < on_policy + target_share else "fixed")
    return out


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             pad_id: int, eos_id: int | None) -> list[list[int]]:
    """HF generate, left-padded batch; each continuation is cut after its first EOS."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=eos_id, **sampling)
    conts = []
    for row in out[:, width:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        conts.append(row)
    return conts


def pack(prompts: list[list[int]], conts: list[list[int]], max_length: int, pad_id: int):
    """Right-padded [B, L] ids, attention mask, and [B, L] mask of positions whose NEXT token
    is a continuation token (where the loss applies)."""
    seqs = [(p + c)[:max_length] for p, c in zip(prompts, conts)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for r, (s, p) in enumerate(zip(seqs, prompts)):
        ids[r, : len(s)] = torch.tensor(s)
        attn[r, : len(s)] = 1
        loss_mask[r, len(p) - 1 : len(s) - 1] = True
    return ids, attn, loss_mask


def fixed_continuation(tokenizer, reference: str, max_new_tokens: int, eos: int | None,
                       ends: bool = True) -> list[int]:
    """The reference answer's ids then EOS, cut to ``max_new_tokens`` (no EOS when cut, nor
    when the text does not end there: ``ends`` False, a make-data row cut at its limit)."""
    ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    return (ids + ([eos] if eos is not None and ends else []))[:max_new_tokens]


def sparse_logits(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """Top-k logits back to [N, V]: ``values`` [N, k] at ``indices`` [N, k], ``-inf`` elsewhere,
    so argmax is exact and a softmax renormalises over the k kept tokens."""
    out = torch.full((values.shape[0], vocab), float("-inf"), dtype=values.dtype)
    return out.scatter_(-1, indices.long(), values)


def open_target_cache(cfg: SpecTrainConfig, target_ref, sequences: list[list[int]]):
    """The target cache of the fixed-text sequences (prompt + cut answer) of every training row,
    keyed by the target's weights, the token ids and the options that change what is stored."""
    options = {"kind": "spec-topk", "top_k": cfg.cache_top_k, "max_length": cfg.max_length,
               "max_new_tokens": cfg.max_new_tokens}
    return TeacherCache(cfg.target_cache, model_fingerprint(target_ref.directory),
                        data_fingerprint(sequences), options, len(sequences), shard_size=64,
                        flag="--target-cache")


def target_logit_fn(target, vocab: int | None = None) -> Callable[..., torch.Tensor]:
    """``fn(hidden [c, Ht], values [c, k] = None, index [c, k] = None, cached [c] = None)
    -> [c, V]`` float32 target logits: from the target's final hidden states, and at rows
    where ``cached`` from its top-k logits (``-inf`` elsewhere, :func:`sparse_logits`).
    ``target`` None (``--labels data``): every row is cached, over ``vocab`` tokens."""
    head = softcap = None
    if target is not None:
        _, head, softcap = decoder_and_head(target)
        vocab = head.weight.shape[0]

    def fn(hidden, values=None, index=None, cached=None) -> torch.Tensor:
        if values is None:
            return head_logits(hidden, head, softcap)
        out = sparse_logits(values, index, vocab)
        online = ~cached
        if bool(online.any()):
            out[online] = head_logits(hidden[online], head, softcap)
        return out

    return fn


def label_inputs(labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`target_logit_fn`'s inputs that make the target a one-hot on ``labels`` [N]
    (``--labels data``): (hidden [N, 1] unused, values [N, 1] zeros, index [N, 1], cached
    [N] all true)."""
    n = labels.numel()
    return (torch.zeros(n, 1, device=labels.device), torch.zeros(n, 1, device=labels.device),
            labels.reshape(n, 1).long(), torch.ones(n, dtype=torch.bool, device=labels.device))


def next_tokens(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] the token after each loss position of ``mask`` [B, L] in ``ids`` [B, L]."""
    return ids.roll(-1, dims=1)[mask]


def predictable(ids: torch.Tensor, mask: torch.Tensor, head_ids: torch.Tensor | None) -> torch.Tensor:
    """``mask`` [B, L] without the positions whose next token a reduced head (``head_ids``
    [K]) cannot propose: no draft of it is ever accepted there, and with labels from the
    text they have no target on its K tokens."""
    if head_ids is None:
        return mask
    return mask & torch.isin(ids.roll(-1, dims=1), head_ids.to(ids.device))


def target_inputs(target, ids, attn, mask, sources: list[str], row_ids: list[int],
                  cached=None, top_k: int = 1) -> tuple[torch.Tensor, ...]:
    """What :func:`target_logit_fn` reads at the N loss positions (row-major, as
    ``mask``): the target's final hidden states [N, Ht] (online), and with ``cached(row ids)
    -> [(values [n * k], ids [n * k])]`` the fixed rows' cached top-k instead: then
    ``(hidden, values [N, k], index [N, k], cached [N] bool)``."""
    if cached is None:
        return (final_hidden_states(target, ids, attn)[mask],)
    counts = mask.sum(-1).tolist()
    starts = [sum(counts[:r]) for r in range(len(counts))]
    n, width = sum(counts), target.config.get_text_config().hidden_size
    hidden = torch.zeros(n, width, device=ids.device)
    values = torch.full((n, top_k), float("-inf"), device=ids.device)
    index = torch.zeros(n, top_k, dtype=torch.long, device=ids.device)
    from_cache = torch.zeros(n, dtype=torch.bool, device=ids.device)
    online = [r for r, s in enumerate(sources) if s != "fixed"]
    if online:
        computed = final_hidden_states(target, ids[online], attn[online])[mask[online]]
        for r, block in zip(online, computed.split([counts[r] for r in online])):
            hidden[starts[r]: starts[r] + counts[r]] = block
    fixed = [r for r, s in enumerate(sources) if s == "fixed"]
    if fixed:
        for r, (v, i) in zip(fixed, cached([row_ids[r] for r in fixed])):
            at = slice(starts[r], starts[r] + counts[r])
            values[at] = v.view(counts[r], top_k).to(ids.device)
            index[at] = i.view(counts[r], top_k).long().to(ids.device)
            from_cache[at] = True
    return hidden, values, index, from_cache


def heldout_acceptance(draft, rows: DraftRows, held_inputs: tuple[torch.Tensor, ...], target_fn,
                       batch, temperature: float, verify: str = "probabilistic") -> dict:
    """Exact per-token acceptance of the draft (with the head it is served with) on fixed
    held-out sequences, under each rule (at temperature 0 both are argmax agreement), and
    the one ``verify`` names; ``held_inputs`` are :func:`target_logit_fn`'s inputs at
    ``batch``'s positions (the target's final hidden states, or :func:`label_inputs`)."""
    ids, attn, mask = batch
    _, _, softcap = decoder_and_head(draft)
    with torch.inference_mode():
        hidden = final_hidden_states(draft, ids, attn)[mask]
        rules = chunked_acceptance(hidden, rows.head, held_inputs, target_fn, temperature,
                                   rows.head_ids, softcap,
                                   positions_per_chunk(draft.config.get_text_config().vocab_size))
    out = {"heldout_acceptance": float(rules["probabilistic"].mean()),
           "heldout_greedy_acceptance": float(rules["greedy"].mean()),
           "heldout_argmax_agreement": float(rules["agree"].mean())}
    out["heldout_rule_acceptance"] = float(rules[verify].mean())
    return out


def train(cfg: SpecTrainConfig) -> dict:
    cfg.validate()
    t_start = time.perf_counter()
    out = training.prepare_out(cfg)
    examples = read_examples(cfg.data, cfg.num_examples)  # bad data fails before any model
    if cfg.on_policy + cfg.target_generated < 1 and any(e.reference is None for e in examples):
        raise UsageError(f"{cfg.data} has rows without an answer/completion, so it cannot "
                         "supply fixed data; pass --on-policy 1 or --target-generated")
    heldout = examples[len(examples) - cfg.heldout:] if cfg.heldout else []
    train_rows = examples[: len(examples) - cfg.heldout] if cfg.heldout else examples
    if not train_rows:
        raise UsageError(f"{cfg.data} has no rows left after --heldout {cfg.heldout}; "
                         "pass more data or a smaller --heldout")
    target_ref, draft_ref = modelio.resolve(cfg.target), modelio.resolve(cfg.draft)
    check_shared_vocabulary(target_ref, draft_ref, cfg.trust_remote_code)

    accelerator = training.setup_accelerator(cfg.device, cfg.seed)
    micro = training.micro_batch_size(cfg.batch_size, accelerator.num_processes, cfg.grad_accum)
    per_process = micro * cfg.grad_accum
    device = accelerator.device
    progress.get().start("load")
    tokenizer = modelio.load_tokenizer(target_ref, cfg.trust_remote_code)
    labels, why = resolved_labels(cfg)
    progress.get().message(f"labels: {labels} ({why})")
    from_data = labels == "data"  # the target is never run: it is not loaded
    target = None if from_data else modelio.load_model(
        target_ref, device=str(device), trust_remote_code=cfg.trust_remote_code)
    draft = modelio.load_model(draft_ref, device=str(device),
                               trust_remote_code=cfg.trust_remote_code)
    head, head_source = head_token_ids(draft.config), "draft"
    if head is None:
        head = head_for(tokenizer, target_ref, train_rows, cfg.head_tokens,
                        draft.config.get_text_config().vocab_size, cfg.chat)
        head_source = "full" if head is None else "data"
        if head is not None:
            setattr(draft.config.get_text_config(), CONFIG_KEY, head.tolist())
    progress.get().message(f"head: {HEAD_SOURCES[head_source]}" if head is None else
                           f"head: {head.numel()} tokens, {HEAD_SOURCES[head_source]}")
    for p in target.parameters() if target is not None else ():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        training.enable_gradient_checkpointing(draft)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = modelio.load_generation_config(target_ref).eos_token_id
    eos = (eos[0] if isinstance(eos, list) else eos) if eos is not None else tokenizer.eos_token_id

    def encode(rows: list[Example]) -> list[list[int]]:
        return [encode_prompt(tokenizer, e.prompt, cfg.chat) for e in rows]

    # Only the embedding and head rows the loss reaches train (exact at weight decay 0; see
    # spec_decode.trainable_rows): the tokens read are known in advance on fixed text only.
    fixed_only = cfg.on_policy + cfg.target_generated == 0
    reads = None
    if fixed_only:
        reads = torch.tensor([pad] + [t for e, p in zip(train_rows, encode(train_rows))
                                      for t in p + fixed_continuation(
                                          tokenizer, e.reference, cfg.max_new_tokens, eos, e.ends)])
    vocab_rows = split_rows(draft, head_token_ids(draft.config), reads,
                      split=cfg.weight_decay == 0)
    params = [p for p in draft.parameters() if p.requires_grad]
    target_fn = target_logit_fn(target, draft.config.get_text_config().vocab_size)
    chunk = positions_per_chunk(draft.config.get_text_config().vocab_size)
    optimizer = training.build_optimizer(params, cfg.lr, cfg.weight_decay)
    scheduler = training.warmup_then_linear_decay(optimizer, cfg.warmup_steps, cfg.steps)
    main = accelerator.is_main_process
    step, log = training.start_run(cfg, out, draft, optimizer, scheduler, main)

    # Held-out sequences: target continuations of held-out prompts, scored once.
    held_batch = held_target = None
    if heldout:
        progress.get().start("held-out targets")
        hp = encode(heldout)
        if from_data:  # the held-out rows' own text is the target's continuation
            hc = [fixed_continuation(tokenizer, e.reference, cfg.max_new_tokens, eos, e.ends)
                  for e in heldout]
        else:
            target.eval()
            hc = generate(target, hp, cfg.max_new_tokens, cfg.temperature, pad, eos)
        held_batch = tuple(t.to(device) for t in pack(hp, hc, cfg.max_length, pad))
        if from_data:
            held_target = label_inputs(next_tokens(held_batch[0], held_batch[2]))
        else:
            with torch.inference_mode():
                held_target = (final_hidden_states(target, held_batch[0],
                                                   held_batch[1])[held_batch[2]],)
        if step == 0:
            log.log(step=0, **heldout_acceptance(draft, vocab_rows, held_target, target_fn, held_batch,
                                                 cfg.temperature, cfg.verify))

    cached = None
    if cfg.target_cache and cfg.on_policy + cfg.target_generated < 1:
        fixed_seqs = [(p, fixed_continuation(tokenizer, e.reference, cfg.max_new_tokens, eos,
                                             e.ends))
                      for p, e in zip(encode(train_rows), train_rows)]
        cache = open_target_cache(cfg, target_ref, [p + c for p, c in fixed_seqs])

        _, target_head, target_softcap = decoder_and_head(target)

        def top_k(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            top = logits.topk(cfg.cache_top_k, dim=-1)
            return top.values, top.indices

        def compute_top_k(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            """Top-k target logits at each loss position of examples ``indices``, flattened
            ([n * k] values, [n * k] ids as float32: exact below 2**24)."""
            stats = []
            for at in range(0, len(indices), 8):
                part = [fixed_seqs[i] for i in indices[at: at + 8]]
                ids, attn, mask = (t.to(device) for t in pack(
                    [p for p, _ in part], [c for _, c in part], cfg.max_length, pad))
                with torch.inference_mode():
                    hidden = final_hidden_states(target, ids, attn)[mask]
                    values, top_ids = (x[0] for x in map_logit_chunks(
                        top_k, hidden[None], target_head, (), LOGIT_CHUNK, target_softcap))
                counts = mask.sum(-1).tolist()
                for v, i in zip(values.cpu().split(counts), top_ids.cpu().split(counts)):
                    stats.append((v.reshape(-1), i.float().reshape(-1)))
            return stats

        def cached(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return cache.get(indices, compute_top_k)

    # Data order: a seeded permutation; step s of process r reads a fixed slice of it.
    order = list(range(len(train_rows)))
    random.Random(cfg.seed).shuffle(order)
    per_step = cfg.batch_size
    progress.get().start("train")
    bar = training.progress(cfg.steps, step, disable=cfg.quiet or not main)
    last: dict = {}
    while step < cfg.steps:
        t0 = time.perf_counter()
        start = step * per_step + accelerator.process_index * per_process
        row_ids = [order[(start + i) % len(order)] for i in range(per_process)]
        rows = [train_rows[i] for i in row_ids]
        rng = random.Random(cfg.seed * 1_000_003 + step * 101 + accelerator.process_index)
        sources = pick_sources(rng, len(rows), on_policy_share(cfg, step), cfg.target_generated)
        prompts = encode(rows)
        conts: list[list[int]] = [[] for _ in rows]
        for source, model in (("on_policy", draft), ("target", target)):
            idx = [i for i, s in enumerate(sources) if s == source]
            if idx:
                torch.manual_seed(cfg.seed + step)
                model.eval()
                gen = generate(model, [prompts[i] for i in idx], cfg.max_new_tokens,
                               cfg.temperature, pad, eos)
                for i, c in zip(idx, gen):
                    conts[i] = c
        for i, s in enumerate(sources):
            if s == "fixed":
                conts[i] = fixed_continuation(tokenizer, rows[i].reference, cfg.max_new_tokens,
                                              eos, rows[i].ends)
        # Micro-batches of the process's prompts: each loss is its mean over its positions
        # times its share of the process's positions, so their sum is the whole mean.
        parts = [slice(m * micro, (m + 1) * micro) for m in range(cfg.grad_accum)]
        packed = [tuple(t.to(device) for t in pack(prompts[p], conts[p], cfg.max_length, pad))
                  for p in parts]
        if from_data:
            packed = [(ids, attn, predictable(ids, mask, vocab_rows.head_ids))
                      for ids, attn, mask in packed]
        tokens = sum(int(mask.sum()) for _, _, mask in packed)
        draft.train()
        _, _, softcap = decoder_and_head(draft)
        loss_value = accept = 0.0
        for p, (ids, attn, mask) in zip(parts, packed):
            with torch.no_grad():
                t_inputs = label_inputs(next_tokens(ids, mask)) if from_data else target_inputs(
                    target, ids, attn, mask, sources[p], row_ids[p], cached, cfg.cache_top_k)
            # Chunk by chunk from hidden states: no [N, V] tensor of either model is kept.
            hidden = final_hidden_states(draft, ids, attn)[mask]
            per_pos, accepted = chunked_divergence(
                hidden, vocab_rows.head, t_inputs, target_fn, cfg.divergence, cfg.temperature,
                cfg.verify, cfg.beta, vocab_rows.head_ids, softcap, chunk)
            share = per_pos.numel() / max(tokens, 1)
            loss = per_pos.mean() * share
            loss.backward()
            loss_value += loss.item()
            accept += float(accepted.sum()) / max(tokens, 1)
            del hidden, per_pos, loss, t_inputs
        grad_norm = training.apply_gradients(accelerator, params, optimizer, scheduler)
        step += 1
        last = {**training.step_figures(step, loss_value, grad_norm, scheduler.get_last_lr()[0],
                                        tokens, time.perf_counter() - t0),
                "train_acceptance": accept, **{f"n_{s}": sources.count(s) for s in SOURCES}}
        if held_batch is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            draft.eval()
            last.update(heldout_acceptance(draft, vocab_rows, held_target, target_fn, held_batch,
                                           cfg.temperature, cfg.verify))
        log.log(**last)
        bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{accept:.3f}",
                        tok_s=f"{last[training.TOKENS_PER_S]:.0f}")
        bar.update(1)
        if training.checkpoint_due(step, cfg.checkpoint_every, cfg.steps):
            if main:
                training.save_checkpoint(out / "checkpoints", step, draft, optimizer, scheduler,
                                         extra={"data_position": step * per_step})
            accelerator.wait_for_everyone()
    bar.close()
    progress.get().start("save")
    # The save copies every weight of the draft into a buffer: drop the AdamW moments and the
    # target (its weights are mapped from disk) and hand their memory back first.
    optimizer.state.clear()
    target = target_fn = cached = compute_top_k = target_head = None
    training.release_freed_memory()
    summary = {"out": str(out), "steps": step, "seconds": round(time.perf_counter() - t_start, 1),
               "final": last, "divergence": cfg.divergence, "temperature": cfg.temperature,
               "verify": cfg.verify, "labels": labels,
               "head": {"tokens": None if head is None else int(head.numel()),
                        "source": head_source}}
    vocab_rows.restore()  # the trained rows back into the draft's own matrices
    if main:
        head_ids = head_token_ids(draft.config)
        # save_pretrained renames a reduced-head draft's architecture: name it again.
        training.save_final(cfg, out, draft, tokenizer, {"train.json": summary},
                            finish=None if head_ids is None else lambda d: record_head(d, head_ids))
    return summary


def render(summary: dict) -> str:
    f = summary["final"]
    parts = [f"wrote {summary['out']} after {summary['steps']} steps in {summary['seconds']} s"]
    if f:
        parts.append(f"  final {summary['divergence']} loss {f['loss']:.4f}, train acceptance "
                     f"{f['train_acceptance']:.3f}"
                     + (f", held-out acceptance {f['heldout_acceptance']:.3f} (argmax agreement "
                        f"{f['heldout_argmax_agreement']:.3f})" if "heldout_acceptance" in f else ""))
    return "\n".join(parts)
