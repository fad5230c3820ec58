"""One process of the fast FSDP equivalence check (tests/distill/test_fsdp.py starts two).

Each process builds the same tiny Gemma-3 student (tied head and embeddings, soft-capped
logits) and an unsharded copy. The copy takes the whole batch; the sharded model
(:func:`tokensurgeon.training.shard`) takes this process's half, and its loss (realised-token
and boundary-set log-probs from the fused closed-form backward,
:func:`tokensurgeon.logits.position_statistics`) runs inside the root's forward, scaled by
the world size as the trainer scales it. The statistics, every parameter's gradient (the
shards gathered) and the weights after one AdamW step must equal the copy's. Exits 1 with
the failing comparison on stderr.

Run: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P python fsdp_check.py``, or
:func:`main` in forked processes (the test: no second import of torch and transformers).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny)

import tiny

from tokensurgeon import training
from tokensurgeon.logits import decoder_and_head, position_statistics

# Same tolerances as the two-process data-parallel test: the sharded run sums the same
# terms in another order (half batches, then a reduce-scatter), float32 rounding only.
RTOL, ATOL = 1e-4, 1e-5


def statistics(model, ids: torch.Tensor, need: torch.Tensor, boundary_ids: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    decoder, head, softcap = decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return position_statistics(hidden.float(), head, ids.roll(-1, 1), boundary_ids, 5,
                               softcap, need_boundary=need)


def objective(realised: torch.Tensor, boundary: torch.Tensor, units: int) -> torch.Tensor:
    """What the ALM and SFT terms read of the student, summed over the global unit count."""
    return -(realised.sum() + 0.5 * boundary.sum()) / units


def main() -> int:
    """The check in this process (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` from the environment); 0 when everything matched."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    vocab = 97
    student = tiny.tiny_gemma(vocab, tied=True, seed=4).train()
    student.config.final_logit_softcapping = 30.0
    reference = copy.deepcopy(student)
    ids = torch.randint(0, vocab, (2 * world, 12))
    need = torch.rand(ids.shape) > 0.5
    boundary_ids = torch.tensor([1, 5, 9, 40])
    units = ids.numel()

    full_r, full_b = statistics(reference, ids, need, boundary_ids)
    objective(full_r, full_b, units).backward()

    call = training.shard(training.ModelCall(student),
                          decoder_and_head(student)[0].layers, torch.device("cpu"), world)
    assert training.is_sharded(student)
    mine = slice(2 * rank, 2 * rank + 2)

    def run(model, ids, need):
        r, b = statistics(model, ids, need, boundary_ids)
        return r, b, objective(r, b, units) * world

    r, b, loss = call(run, ids[mine], need[mine])
    loss.backward()

    failures = []

    def compare(what: str, got: torch.Tensor, expected: torch.Tensor) -> None:
        try:
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
        except AssertionError as exc:
            failures.append(f"{what}: {str(exc).splitlines()[0:4]}")

    compare("realised", r.detach(), full_r[mine].detach())
    compare("boundary", b.detach(), full_b[mine].detach())
    expected = dict(reference.named_parameters())
    for name, p in student.named_parameters():
        compare(f"grad {name}", p.grad.full_tensor(), expected[name].grad)
    for model in (student, reference):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        optimizer.step()
    for name, p in student.named_parameters():
        compare(f"updated {name}", p.detach().full_tensor(), expected[name].detach())
    print(f"rank {rank}: {len(failures)} mismatches", flush=True)
    for line in failures[:5]:
        print(line, file=sys.stderr, flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
