"""``tokensurgeon distill``: the distillation training loop (one readable loop, torchtune style).

Boundary: wires data, models and losses together and owns the step. The loss math lives in
:mod:`distill.losses`, alignment in :mod:`distill.alignment`, and optimisation, checkpoints
and logging in :mod:`tokensurgeon.training`. The loop names no loss: it asks each loss of
``--loss`` what it reads of the teacher (nothing, statistics the teacher cache can serve,
or hidden states that need the teacher online) and of the student, and a loss's options
are flags through :func:`tokensurgeon.config.member_options`.

One optimizer step:
1. take this process's share of the step's global batch and split it into micro-batches;
2. run the teacher (no gradient) on every micro-batch and count each loss's units (aligned
   chunks after merging, tokens, ...); sum the counts over processes;
3. run the student on each micro-batch; every loss is its sum divided by the global count,
   so the gradient equals that of one process holding the whole batch;
4. average gradients over processes, clip to 1.0, step AdamW and the schedule.
With ``--fsdp`` the student is sharded over the processes (FSDP2): every use of its
weights (the forward, the losses with the fused head, held-out scoring) runs as the
forward of the sharded root, :class:`tokensurgeon.training.ModelCall`, where the head and
embeddings are whole; gradients are averaged by FSDP's reduce-scatter instead.
Forward passes run under ``--dtype`` autocast (fp32 master weights); the head and the
losses stay in fp32. Chat rows are rendered by each side's own template and only their
assistant text is trained (:mod:`distill.chat`). With ``--eval-data``, the student's
held-out bits per byte is measured every ``--eval-every`` steps (:mod:`distill.heldout`);
the best checkpoint is kept beside the newest. Checkpoints go to ``OUT/checkpoints/step-N``
(the best held-out one to ``OUT/checkpoints/best/step-N``); the finished model replaces OUT
atomically.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from distill import heldout
from distill.chat import chat_template, needs_templates
from distill.data import (
    CHAT_MODES,
    DATA_FORMATS,
    PACK_MODES,
    batch_indices,
    build_examples,
    collate,
    read_documents,
)
from distill.losses import (
    DEFAULT_LOSS,
    LOSSES,
    LossInputs,
    Side,
    loss_settings,
    parse_loss_spec,
    side_statistics,
    validate_loss_options,
)
from tokensurgeon import modelio, progress, training
from tokensurgeon.config import member_options
from tokensurgeon.errors import UsageError
from tokensurgeon.logits import LOGIT_CHUNK, decoder_and_head
from tokensurgeon.teacher_cache import TeacherCache, data_fingerprint, model_fingerprint
from tokensurgeon.token_identity import vocabulary

TRAINABLE = ("full", "lora", "embeddings")
LOGITS_PATHS = ("fused", "checkpoint")
# Options besides the shared ones (training.RESUME_FREE_OPTIONS) that may change between a
# run and its --resume without changing the result.
RESUME_FREE_OPTIONS = {"teacher_cache", "logits", "gradient_checkpointing", "eval_data",
                       "eval_chat", "eval_every", "report_to"}
# A loss term whose share of the last layer's gradient (first step) is below this is
# reported: it barely trains (as ALM in probability units beside sft did).
MIN_GRADIENT_SHARE = 0.01
HELDOUT_PLOT = "heldout_bpb.png"


def _listed(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


_CACHEABLE = sorted(name for name, loss in LOSSES.items() if loss.cacheable)
_ONLINE = sorted(name for name, loss in LOSSES.items() if not loss.cacheable)


@member_options(LOSSES, after="loss")
@dataclass
class DistillConfig(training.TrainingOptions):
    """Distil TEACHER into STUDENT, whose tokenizer may differ, with the losses --loss
    names, and write the trained student to OUT as a Hugging Face model directory."""

    teacher: str = field(metadata={"help": "teacher: HF directory, .gguf file or builtin:NAME"})
    student: str = field(metadata={
        "help": "student (for tokenizer transfer: the transplanted copy of the teacher)"})
    data: list[str] = field(metadata={
        "help": ".txt, .jsonl, .parquet, .json or a saved datasets directory (rows: text / "
                "question+answer / messages / prompt+completion); repeat for several"})
    out: str = field(metadata={"help": "output HF model directory; checkpoints go under it"})
    loss: str = field(default=DEFAULT_LOSS, metadata={
        "names": LOSSES.names,
        "help": f"losses joined by + with optional :weight, e.g. {DEFAULT_LOSS} or "
                f"{DEFAULT_LOSS.replace('+', ':1+', 1)}:0.5"})
    train: str = field(default="full", metadata={
        "help": "what is trained", "choices": TRAINABLE})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank (--train lora)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (--train lora)"})
    max_length: int = field(default=256, metadata={"help": "tokens per sequence, each side"})
    pack: str = field(default=PACK_MODES[0], metadata={
        "help": "fill: texts joined and cut where both tokenizations agree, so every "
                "sequence is full; texts: whole texts per sequence, each truncated (the "
                "earlier default); none: one text per sequence, truncated",
        "choices": PACK_MODES})
    data_format: str = field(default="auto", metadata={
        "help": "row layout (auto: text, then question+answer, messages, prompt+completion)",
        "choices": DATA_FORMATS})
    chat: str = field(default=CHAT_MODES[0], metadata={
        "help": "template: each side renders conversations with its own chat template and "
                "only assistant turns (and completions) are trained; flat: 'role: content' "
                "lines trained as plain text (the earlier layout)", "choices": CHAT_MODES})
    teacher_chat_template: str | None = field(default=None, metadata={
        "help": "jinja chat template file for the teacher (for a model without one)"})
    student_chat_template: str | None = field(default=None, metadata={
        "help": "jinja chat template file for the student (for a model without one)"})
    gradmag: bool = field(default=False, metadata={
        "help": "weight losses by 1/|grad of the last layer| instead of their weights"})
    logit_chunk: int = field(default=LOGIT_CHUNK, metadata={
        "help": "positions per lm_head call (bounds memory for large vocabularies)"})
    logits: str = field(default="fused", metadata={
        "help": "student log-prob gradients: fused (closed-form backward, logits kept when "
                "they fit 1 GiB) or checkpoint (autograd with recomputation; the earlier, "
                "slower path)", "choices": LOGITS_PATHS})
    teacher_cache: str | None = field(default=None, metadata={
        "help": "directory of the teacher's cached per-token statistics, filled on first use "
                "and reused by later runs on the same teacher, data and options "
                f"({_listed(_CACHEABLE)} only; {_listed(_ONLINE)} run the teacher online)"})
    teacher_cache_shard: int = field(default=16, metadata={
        "help": "examples per teacher-cache shard (a shard is computed whole on first use)"})
    dtype: str = field(default=training.DTYPES[0], metadata={
        "help": "forward precision: autocast in bf16/fp16 over fp32 master weights (head and "
                "losses stay fp32); bf16 needs AVX512-BF16/AMX on a CPU, fp16 a GPU",
        "choices": training.DTYPES})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the student's decoder layers in the backward (less memory, more "
                "compute)"})
    eval_data: list[str] = field(default_factory=list, metadata={
        "help": "held-out data (same formats as --data) scored in bits per byte of the "
                "student; conversations score their assistant text only"})
    eval_chat: str | None = field(default=None, metadata={
        "help": "how held-out conversations are scored (template: the assistant text under "
                "the student's template; flat: every byte of 'role: content' lines); default: "
                "as --chat", "choices": CHAT_MODES})
    eval_every: int = field(default=0, metadata={
        "help": "steps between held-out evaluations (also before the first step and after "
                "the last); 0: after the last step only"})
    report_to: str = field(default="none", metadata={
        "help": "experiment tracker (accelerate's; tensorboard writes OUT/tensorboard, "
                "offline)", "choices": training.TRACKERS})
    fsdp: bool = field(default=False, metadata={
        "help": "shard the student's weights, gradients and optimizer state over the "
                "processes (FSDP2; launch 2 or more with torchrun or accelerate launch, "
                "whose --use_fsdp also turns this on); same losses and update as unsharded"})

    def validate(self) -> None:
        super().validate()
        for name in ("max_length", "logit_chunk", "lora_rank", "teacher_cache_shard"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_length < 2:
            raise UsageError("--max-length must be >= 2 (a token and its prefix)")
        validate_loss_options(self)
        if not self.data:
            raise UsageError("pass at least one --data file")
        if self.eval_every < 0:
            raise UsageError("--eval-every must be >= 0")
        if self.eval_every and not self.eval_data:
            raise UsageError("--eval-every needs --eval-data FILE (held-out text)")
        training.check_trackers(self.report_to)
        if self.fsdp and self.train == "lora":
            raise UsageError("--train lora is not merged from shards; use --train full or "
                             "embeddings with --fsdp, or drop --fsdp")
        if self.fsdp and self.gradmag:
            raise UsageError("--gradmag differentiates each loss by the last layer's weights, "
                             "which --fsdp shards; drop --gradmag or --fsdp")
        if self.fsdp and self.dtype == "fp16":
            raise UsageError("--dtype fp16 needs loss scaling across shards; use --dtype bf16 "
                             "with --fsdp")
        online = [name for name, _ in self.terms if not LOSSES[name].cacheable]
        if self.teacher_cache and online:
            raise UsageError(f"--teacher-cache serves {_listed(_CACHEABLE)} only; "
                             f"{', '.join(online)} reads the teacher's hidden states: drop "
                             "--teacher-cache")

    @cached_property
    def terms(self) -> list[tuple[str, float]]:
        """``--loss`` parsed once: [(loss name, weight), ...]."""
        try:
            return parse_loss_spec(self.loss)
        except ValueError as exc:
            raise UsageError(f"--loss {self.loss!r}: {exc}") from None


def boundary_ids(token_bytes: tuple[bytes | None, ...]) -> torch.Tensor:
    """Ids of tokens that start with a space, newline or tab, plus specials."""
    return torch.tensor([i for i, b in enumerate(token_bytes)
                         if b is None or b[:1] in (b" ", b"\n", b"\t")], dtype=torch.long)


def select_trainable(model, cfg: DistillConfig):
    """Set ``requires_grad`` for full / LoRA / embeddings-only training; return the model."""
    if cfg.train == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UsageError("--train lora needs peft; run: pip install 'tokensurgeon[distill]'"
                             ) from None
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    model.requires_grad_(cfg.train == "full")
    if cfg.train == "embeddings":
        model.get_input_embeddings().weight.requires_grad_(True)
        model.get_output_embeddings().weight.requires_grad_(True)
    return model


def open_teacher_cache(cfg: DistillConfig, teacher_ref, examples,
                       device_type: str) -> TeacherCache:
    """The teacher cache for these examples (keyed by teacher weights, token and chunk ids)."""
    rows = [r for e in examples for r in (e.teacher_ids, e.teacher_chunks)]
    # Which tokens are trained changes which statistics are computed (chat data only, so
    # caches of plain text keep their key).
    rows += [e.teacher_trained for e in examples if e.teacher_trained]
    options = {"statistics": "realised-token log-prob; boundary-set log-prob at chunk ends",
               "device": device_type,
               # (fp32 adds nothing, so caches written before --dtype existed stay valid)
               **({"dtype": cfg.dtype} if cfg.dtype != training.DTYPES[0] else {})}
    return TeacherCache(cfg.teacher_cache, model_fingerprint(teacher_ref.directory),
                        data_fingerprint(rows), options, len(examples), cfg.teacher_cache_shard,
                        flag="--teacher-cache")


def last_layer_params(model) -> list[torch.nn.Parameter]:
    """Trainable parameters of the final decoder layer (all trainable ones if it has none)."""
    decoder, _, _ = decoder_and_head(model)
    last = [p for p in decoder.layers[-1].parameters() if p.requires_grad]
    return last or [p for p in model.parameters() if p.requires_grad]


def distill(cfg: DistillConfig) -> dict:
    """Run the training described by ``cfg``; return a summary dict."""
    if training.adopt_fsdp_launch():  # accelerate launch --use_fsdp
        cfg.fsdp = True
    cfg.validate()
    # Rows are read (and bad ones refused) before anything is loaded or written. A .txt
    # file is one text when sequences are cut from a stream; otherwise ~2 chars per token
    # keeps most of its segments within max_length.
    docs = read_documents(cfg.data, cfg.data_format,
                          None if cfg.pack == "fill" else 2 * cfg.max_length, cfg.chat)
    eval_docs = read_documents(cfg.eval_data, cfg.data_format, None,
                               cfg.eval_chat or cfg.chat) \
        if cfg.eval_data else []
    if cfg.eval_data and not eval_docs:
        raise UsageError(f"--eval-data {' '.join(cfg.eval_data)} holds no text; pass "
                         "held-out text")
    terms = cfg.terms
    out_path = Path(cfg.out).expanduser()
    accelerator = training.setup_accelerator(cfg.device, cfg.seed, cfg.report_to, out_path)
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if cfg.fsdp and world < 2:
        raise UsageError("--fsdp shards the student over several processes; launch 2 or more "
                         "(torchrun --nproc_per_node 2 -m cli distill ..., or accelerate "
                         "launch --num_processes 2), or drop --fsdp")
    per_process = training.micro_batch_size(cfg.batch_size, world, cfg.grad_accum)
    device = accelerator.device
    training.check_precision(device, cfg.dtype)
    out = training.prepare_out(cfg, RESUME_FREE_OPTIONS) if is_main else out_path
    accelerator.wait_for_everyone()

    progress.get().start("load")
    t_ref, s_ref = modelio.resolve(cfg.teacher), modelio.resolve(cfg.student)
    t_tok = modelio.load_tokenizer(t_ref, cfg.trust_remote_code)
    s_tok = modelio.load_tokenizer(s_ref, cfg.trust_remote_code)
    t_vocab, s_vocab = vocabulary(t_tok), vocabulary(s_tok)
    # Conversations need a template on each side that renders them (held-out ones: the
    # student's only).
    templates = (
        chat_template(t_tok, cfg.teacher_chat_template, "teacher")
        if needs_templates(docs) else None,
        chat_template(s_tok, cfg.student_chat_template, "student")
        if needs_templates(docs) or needs_templates(eval_docs) else None)
    examples = build_examples(docs, t_tok, s_tok, t_vocab.token_bytes, s_vocab.token_bytes,
                              cfg.max_length, cfg.pack, templates)
    held = heldout.prepare(eval_docs, s_tok, templates[1], cfg.max_length) if eval_docs \
        else None

    t_hidden_size, s_hidden_size = (
        modelio.load_config(ref, cfg.trust_remote_code).get_text_config().hidden_size
        for ref in (t_ref, s_ref))
    for name, _ in terms:
        if LOSSES[name].needs_same_vocab and t_vocab.token_bytes != s_vocab.token_bytes:
            across = sorted(n for n, loss in LOSSES.items()
                            if not (loss.needs_same_vocab or loss.needs_same_hidden
                                    or loss.teacher == "none"))
            raise UsageError(f"--loss {name} needs teacher and student to share one tokenizer; "
                             f"use {_listed(across).replace(' and ', ' or ')} across tokenizers")
        if LOSSES[name].needs_same_hidden and t_hidden_size != s_hidden_size:
            raise UsageError(f"--loss {name} needs equal hidden sizes (tokenizer transfer); "
                             "drop it for a differently sized student")

    needs = {LOSSES[n].teacher for n, _ in terms}
    # The teacher runs online only for losses that read its hidden states, or for its
    # statistics without a cache; with a cache it is loaded only if a shard is missing.
    teacher_parts: list = []

    def teacher_model() -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
        if not teacher_parts:
            model = modelio.load_model(t_ref, device=device,
                                       trust_remote_code=cfg.trust_remote_code)
            model.requires_grad_(False)
            teacher_parts.extend([model, *decoder_and_head(model)])
        return tuple(teacher_parts[1:])

    online = "online" in needs or ("statistics" in needs and not cfg.teacher_cache)
    if online:
        teacher_model()
    # (--fsdp: loaded on the CPU; sharding moves each process's shards to its device)
    student = modelio.load_model(s_ref, device="cpu" if cfg.fsdp else device,
                                 trust_remote_code=cfg.trust_remote_code)
    student = select_trainable(student, cfg)
    if cfg.gradient_checkpointing:
        training.enable_gradient_checkpointing(student)
    student.train()
    # Every use of the student's weights runs inside call(fn, ...): sharded or not, one path.
    call = training.ModelCall(student)
    if cfg.fsdp:
        training.shard(call, decoder_and_head(student)[0].layers, device, world)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = training.build_optimizer(params, cfg.lr, cfg.weight_decay)
    scheduler = training.warmup_then_linear_decay(optimizer, cfg.warmup_steps, cfg.steps)
    start, metrics = training.start_run(cfg, out, student, optimizer, scheduler, is_main)
    training.start_trackers(accelerator, cfg.report_to, vars(cfg))  # main process only
    scaler = training.grad_scaler(device, cfg.dtype)
    # Read on every process, after the main one has dropped a killed run's rows: all of
    # them take the same best-checkpoint decisions (under --fsdp they save it together).
    accelerator.wait_for_everyone()
    curve = _heldout_curve(out / "metrics.jsonl") if held is not None else []
    best = min((r for r in curve if r[0] > 0), key=lambda r: r[1], default=None)

    s_dec, s_head, s_cap = decoder_and_head(student)
    t_boundary, s_boundary = boundary_ids(t_vocab.token_bytes).to(device), \
        boundary_ids(s_vocab.token_bytes).to(device)
    t_pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0
    s_pad = s_tok.pad_token_id if s_tok.pad_token_id is not None else 0
    settings = loss_settings(cfg, [n for n, _ in terms], recompute=True,
                             fused=cfg.logits == "fused")
    cache = None
    if cfg.teacher_cache and "statistics" in needs:
        cache = open_teacher_cache(cfg, t_ref, examples, device.type)

    def teacher_side(t: dict, hidden: torch.Tensor | None) -> Side:
        head, cap = (teacher_parts[2], teacher_parts[3]) if teacher_parts else (None, None)
        return Side(t["ids"], t["mask"], t["chunk_ids"], hidden, head, t_boundary, cap,
                    t["trained"])

    def compute_teacher(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Teacher statistics of examples ``indices``, per example (cache fill)."""
        t_dec, _, _ = teacher_model()
        out = []
        with torch.no_grad():
            for a in range(0, len(indices), per_process):
                batch = [examples[i] for i in indices[a:a + per_process]]
                t = {k: v.to(device) for k, v in collate(batch, "teacher", t_pad).items()}
                with training.autocast(device, cfg.dtype):
                    hidden = t_dec(input_ids=t["ids"],
                                   attention_mask=t["mask"]).last_hidden_state.float()
                realised, boundary = side_statistics(teacher_side(t, hidden), settings, True)
                for b, e in enumerate(batch):
                    n = len(e.teacher_ids)
                    out.append((realised[b, :n].cpu(), boundary[b, :n].cpu()))
        return out
    def evaluate_student(step: int) -> dict:
        """Held-out bits per byte now; keeps the best checkpoint and the curve's plot."""
        nonlocal best
        student.eval()
        figures = call(lambda model: heldout.bits_per_byte(model, s_tok, held, cfg.logit_chunk))
        student.train()
        curve.append((step, figures["eval_bpb"]))
        # The best trained step (step 0, the student as given, is only the curve's start).
        if step > 0 and (best is None or figures["eval_bpb"] < best[1]):
            best = (step, figures["eval_bpb"])
            training.save_checkpoint(out / "checkpoints" / training.BEST_DIR, step, student,
                                     optimizer, scheduler, {"eval_bpb": best[1]}, keep=1,
                                     write=is_main)
        if is_main:
            plot_heldout(curve, out / HELDOUT_PLOT, cfg.student)
        return figures

    def student_parts(_model, x: LossInputs, counts: torch.Tensor) -> list[torch.Tensor]:
        """Each term's sum over its global unit count; runs as ``call``'s forward, where a
        sharded student's head and embeddings are whole (the fused backward reads them)."""
        with training.autocast(device, cfg.dtype):
            x.student.hidden = s_dec(input_ids=x.student.ids,
                                     attention_mask=x.student.mask).last_hidden_state.float()
        return [LOSSES[name].total(x) / float(counts[j]) for j, (name, _) in enumerate(terms)]

    last_layer = last_layer_params(student)
    progress.get().start("train")
    eval_bpb = None
    if held is not None and cfg.eval_every and start == 0:
        first = evaluate_student(0)
        eval_bpb = first["eval_bpb"]
        metrics.log(step=0, **first)
        accelerator.log(first, step=0)
    bar = training.progress(cfg.steps, start, disable=cfg.quiet or not is_main)
    last: dict = {}
    for step in range(start, cfg.steps):
        began = time.perf_counter()
        chosen = batch_indices(step, cfg.batch_size, len(examples), cfg.seed)
        mine = chosen[rank * per_process * cfg.grad_accum:(rank + 1) * per_process * cfg.grad_accum]
        micro = [[examples[i] for i in mine[m * per_process:(m + 1) * per_process]]
                 for m in range(cfg.grad_accum)]

        # Teacher pass and unit counts for the whole accumulated batch on every process.
        inputs: list[LossInputs] = []
        counts = torch.zeros(len(terms), dtype=torch.float64)
        tokens = 0
        with torch.no_grad():
            for m, batch in enumerate(micro):
                t = {k: v.to(device) for k, v in collate(batch, "teacher", t_pad).items()}
                s = {k: v.to(device) for k, v in collate(batch, "student", s_pad).items()}
                t_hidden = None
                if online:
                    with training.autocast(device, cfg.dtype):
                        t_hidden = teacher_model()[0](
                            input_ids=t["ids"], attention_mask=t["mask"]).last_hidden_state.float()
                x = LossInputs(
                    student=Side(s["ids"], s["mask"], s["chunk_ids"], None, s_head, s_boundary,
                                 s_cap, s["trained"]),
                    teacher=teacher_side(t, t_hidden),
                    num_chunks=max(e.num_chunks for e in batch), settings=settings)
                if cache is not None:
                    indices = mine[m * per_process:(m + 1) * per_process]
                    x.set_teacher_stats(cache.get(indices, compute_teacher))
                counts += torch.tensor([LOSSES[name].count(x) for name, _ in terms], dtype=torch.float64)
                tokens += int(s["mask"].sum())
                inputs.append(x)
        global_counts = accelerator.reduce(counts.to(device), reduction="sum").cpu().clamp(min=1)

        totals = torch.zeros(len(terms), dtype=torch.float64)
        last_layer_norms = torch.zeros(len(terms), dtype=torch.float64)
        shares = None
        for m, x in enumerate(inputs):
            # Scaled by the world size because gradients are averaged over processes.
            parts = call(student_parts, x, global_counts)
            # (under --fsdp the last layer's weights are shards outside the forward: the
            # shares are not measured)
            measure_shares = m == 0 and step == start and len(terms) > 1 and not cfg.gradmag \
                and not cfg.fsdp
            if cfg.gradmag or measure_shares:
                norms = [float(n) for n in last_layer_gradient_norms(parts, last_layer)]
            if cfg.gradmag:
                weights = [1.0 / max(n, 1e-12) for n in norms]
                last_layer_norms += torch.tensor(norms, dtype=torch.float64)
            else:
                weights = [w for _, w in terms]
            if measure_shares:
                shares = gradient_shares(norms, weights)
            combined = sum(w * p for w, p in zip(weights, parts)) / sum(weights)
            scaler.scale(combined * world).backward()
            totals += torch.tensor([float(p.detach()) for p in parts], dtype=torch.float64)
            x.student.hidden = None
        grad_norm = training.apply_gradients(accelerator, params, optimizer, scheduler,
                                             scaler=scaler)

        per_loss = accelerator.reduce(totals.to(device), reduction="sum").cpu()
        all_tokens = int(accelerator.reduce(torch.tensor([tokens], device=device), "sum"))
        seconds = time.perf_counter() - began
        weights = [w for _, w in terms]
        loss_value = float(sum(w * float(v) for w, v in zip(weights, per_loss)) / sum(weights))
        last = {**training.step_figures(step + 1, loss_value, grad_norm,
                                        scheduler.get_last_lr()[0], all_tokens, seconds),
                **{f"loss_{name}": float(per_loss[j]) for j, (name, _) in enumerate(terms)},
                **{f"units_{name}": int(global_counts[j]) for j, (name, _) in enumerate(terms)},
                **({f"gradmag_norm_{name}": float(last_layer_norms[j]) / len(inputs)
                    for j, (name, _) in enumerate(terms)} if cfg.gradmag else {}),
                **({f"grad_share_{name}": shares[j] for j, (name, _) in enumerate(terms)}
                   if shares else {})}
        if shares and is_main:
            weak = [(name, shares[j]) for j, (name, _) in enumerate(terms)
                    if shares[j] < MIN_GRADIENT_SHARE]
            for name, share in weak[:1]:
                print(f"warning: the {name} term is {share:.2%} of the last layer's gradient "
                      f"at step {step + 1} (--loss {cfg.loss}): it barely trains; raise its "
                      "weight (e.g. alm:100) or measure it in larger units", file=sys.stderr)
        if held is not None and (step + 1 == cfg.steps or
                                 (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            figures = evaluate_student(step + 1)
            eval_bpb = figures["eval_bpb"]
            last.update(figures)
        metrics.log(**last)
        accelerator.log({k: v for k, v in last.items() if isinstance(v, (int, float))
                         and k != "step"}, step=step + 1)
        bar.set_postfix(loss=f"{loss_value:.4f}",
                        **{name: f"{float(per_loss[j]):.4f}" for j, (name, _) in enumerate(terms)
                           if len(terms) > 1},
                        tok_s=f"{all_tokens / seconds:.0f}",
                        **({"heldout_bpb": f"{eval_bpb:.4f}"} if eval_bpb is not None else {}))
        bar.update(1)
        if training.checkpoint_due(step + 1, cfg.checkpoint_every, cfg.steps):
            training.save_checkpoint(out / "checkpoints", step + 1, student, optimizer,
                                     scheduler, {"examples_seen": (step + 1) * cfg.batch_size},
                                     write=is_main)
            accelerator.wait_for_everyone()
    bar.close()

    progress.get().start("save")
    for tracker in accelerator.trackers:  # flush the logs before they move into OUT
        tracker.finish()
    if cfg.keep_checkpoints:  # otherwise save_final drops the checkpoints at once
        training.save_checkpoint(out / "checkpoints", cfg.steps, student, optimizer,
                                 scheduler, {"examples_seen": cfg.steps * cfg.batch_size},
                                 write=is_main)
    # A sharded student's full weights, gathered by every process onto the main one.
    weights = training.full_state_dict(student) if cfg.fsdp else None
    if is_main:
        training.save_final(cfg, out, student, s_tok, carry=(HELDOUT_PLOT,), state_dict=weights)
    accelerator.wait_for_everyone()
    # Last: with several processes it also ends the process group.
    accelerator.end_training()
    return {"out": str(out), "steps": cfg.steps, "examples": len(examples),
            "processes": world, "fsdp": cfg.fsdp, "last": last, "loss": cfg.loss, "train": cfg.train,
            **({"best": {"step": best[0], "eval_bpb": best[1]}} if best else {})}


def last_layer_gradient_norms(parts: list[torch.Tensor],
                              params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """|d part / d params| for each loss term (the graph is kept for the real backward)."""
    return [torch.linalg.vector_norm(torch.cat([
        g.reshape(-1) for g in torch.autograd.grad(
            part, params, retain_graph=True, allow_unused=True, materialize_grads=True)]))
        for part in parts]


def gradient_shares(norms: list[float], weights: list[float]) -> list[float]:
    """Each term's share of the combined gradient's magnitude, ``w_j |g_j| / sum_k w_k
    |g_k|`` (a term below :data:`MIN_GRADIENT_SHARE` barely trains)."""
    sizes = [w * n for w, n in zip(weights, norms)]
    total = sum(sizes)
    return [s / total if total > 0 else 0.0 for s in sizes]


def _heldout_curve(path: Path) -> list[tuple[int, float]]:
    """(step, held-out bpb) rows a resumed run logged before."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["eval_bpb"]) for r in rows if r.get("eval_bpb") is not None]


def plot_heldout(curve: list[tuple[int, float]], path: Path, title: str) -> None:
    """Write the held-out bits-per-byte curve as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot([s for s, _ in curve], [b for _, b in curve], marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"student: {Path(title).name}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def render(summary: dict) -> str:
    last = summary["last"]
    figures = ", ".join(f"{k[5:]} {v:.4f}" for k, v in last.items() if k.startswith("loss_"))
    sharded = ", sharded (FSDP)" if summary.get("fsdp") else ""
    return (f"wrote {summary['out']}: {summary['steps']} steps of {summary['loss']} "
            f"({summary['train']}) on {summary['examples']} sequences, {summary['processes']} "
            f"process(es){sharded}; final loss {last.get('loss', float('nan')):.4f} ({figures})")
