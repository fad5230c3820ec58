"""Where a transplanted model's probability goes: leak mass and loss by gold-token kind.

Boundary: :func:`leak_stats` is pure tensor math. :func:`leak_on_text` runs a loaded model
on a text (no files).

Leak mass: at positions whose gold token is one BASE already had (shared), the probability
that all new tokens together take. Rows of new tokens that score high against ordinary
hidden states steal mass from the real tokens everywhere; mean-initialised rows have a bound
on it (Hewitt 2021: by Jensen, ``exp(h . mean) <= mean(exp(h . w))``).
"""

from __future__ import annotations

import math

import torch

from tokensurgeon.logits import apply_softcap, decoder_and_head, final_hidden_states

# A short built-in text (prose and arithmetic, written for this check) so that every
# transplant can report its leak mass without data files.
BUILTIN_TEXT = (
    "The harbour town woke slowly. Fishing boats came in before sunrise, and by seven the "
    "market stalls were covered with crates of mackerel, crabs and bright orange mussels. "
    "Most visitors never noticed the old lighthouse keeper, who still climbed the tower every "
    "evening although the lamp had been automatic for thirty years.\n"
    "A baker sells 48 loaves in the morning and half as many in the afternoon. In the morning "
    "she sells 48 loaves, and in the afternoon she sells 48 / 2 = 24 loaves. Altogether she "
    "sells 48 + 24 = 72 loaves. Each loaf costs $3, so she earns 72 * 3 = $216.\n"
    "In 1851 the railway reached the valley, and within a decade the population had doubled. "
    "The new station, built of local granite, replaced a coaching inn that had served "
    "travellers between the two cities since the early eighteenth century.\n"
)


def leak_stats(hidden: torch.Tensor, head: torch.Tensor, gold: torch.Tensor,
               is_new: torch.Tensor, softcap: float | None = None) -> dict:
    """Leak mass and NLL by gold kind for one sequence.

    Args:
        hidden: [T, H] final hidden states at the positions that predict ``gold``.
        head: [V, H] output matrix.
        gold: [T] the token that follows each position.
        is_new: [V] bool, True for tokens BASE did not have.
        softcap: optional final-logit soft-capping.
    Returns:
        sums (not means): leak (probability on new tokens, summed over shared-gold
        positions), nll_shared / nll_new (nats), n_shared / n_new (positions).
    """
    return logit_stats(apply_softcap(hidden.float() @ head.float().T, softcap), gold, is_new)


def logit_stats(logits: torch.Tensor, gold: torch.Tensor, is_new: torch.Tensor) -> dict:
    """:func:`leak_stats` from logits [T, V] (softcap already applied)."""
    logz = torch.logsumexp(logits, 1)
    new_cols = logits[:, is_new]
    lz_new = torch.logsumexp(new_cols, 1) if new_cols.shape[1] else torch.full_like(logz, -math.inf)
    lp = logits.gather(1, gold.unsqueeze(1)).squeeze(1) - logz
    new_gold = is_new[gold]
    return {"leak": float((lz_new - logz)[~new_gold].exp().double().sum()),
            "nll_shared": float(-lp[~new_gold].double().sum()),
            "nll_new": float(-lp[new_gold].double().sum()),
            "n_shared": int((~new_gold).sum()), "n_new": int(new_gold.sum())}


def leak_on_text(model, tokenizer, is_new: torch.Tensor, text: str = BUILTIN_TEXT,
                 chunk: int = 128) -> dict:
    """Leak mass (mean over shared-gold positions) and bits per byte split by gold kind, on
    ``text`` with the tokenizer's BOS (or EOS) prepended."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([prefix] + tokenizer(text, add_special_tokens=False)["input_ids"])
    _, head_module, softcap = decoder_and_head(model)
    head = head_module.weight.detach()
    with torch.inference_mode():
        batch = ids.unsqueeze(0)
        hidden = final_hidden_states(model, batch, torch.ones_like(batch))[0, :-1]
        total: dict = {}
        for s in range(0, hidden.shape[0], chunk):
            part = leak_stats(hidden[s:s + chunk], head, ids[1:][s:s + chunk],
                              is_new.to(head.device), softcap)
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
    n_bytes = len(text.encode("utf-8")) * math.log(2)
    return {"leak_mass": round(total["leak"] / max(1, total["n_shared"]), 5),
            "bpb": round((total["nll_shared"] + total["nll_new"]) / n_bytes, 4),
            "bpb_shared_gold": round(total["nll_shared"] / n_bytes, 4),
            "bpb_new_gold": round(total["nll_new"] / n_bytes, 4),
            "tokens_shared_gold": total["n_shared"], "tokens_new_gold": total["n_new"],
            "text_bytes": len(text.encode("utf-8"))}


def output_weight_scores(hidden: torch.Tensor, gold: torch.Tensor, vocab_size: int,
                         shared_ids: torch.Tensor, shared_rows: torch.Tensor,
                         new_ids: torch.Tensor, raw_rows: torch.Tensor, mean_row: torch.Tensor,
                         weights: list[float], softcap: float | None = None,
                         chunk: int = 128) -> dict[float, dict]:
    """Loss and leak of every candidate output matrix ``W(lam)``, from one set of hidden states.

    ``W(lam)`` holds ``shared_rows`` at ``shared_ids``, ``mean + lam * (raw - mean)`` at
    ``new_ids`` and ``mean_row`` at every other id (tokens without a row of their own). Its
    logits are ``h . mean + lam * (h . raw - h . mean)`` on the new ids, so one product per
    row set serves every ``lam``; no candidate matrix is built.

    Args:
        hidden: [T, H] final hidden states at the positions that predict ``gold`` [T].
        vocab_size: V, the rows of every candidate.
        shared_ids: [S] ids with a fixed row; shared_rows: [S, H] those rows.
        new_ids: [N] ids whose rows depend on lam; raw_rows: [N, H] their rows at lam = 1.
        mean_row: [H] the row at lam = 0 and of every id in neither list.
        weights: the lam values to score.
    Returns:
        per lam, :func:`leak_stats`' sums (leak, nll_shared, nll_new, n_shared, n_new), where
        "new" is every id outside ``shared_ids``.
    """
    n_shared, n_new = shared_ids.numel(), new_ids.numel()
    n_other = vocab_size - n_shared - n_new  # ids with the mean row at every lam
    kind = torch.full((vocab_size,), 2, dtype=torch.long)  # 0 shared, 1 new, 2 other
    where = torch.zeros(vocab_size, dtype=torch.long)  # position within its kind
    kind[shared_ids], where[shared_ids] = 0, torch.arange(n_shared)
    kind[new_ids], where[new_ids] = 1, torch.arange(n_new)
    totals: dict[float, dict] = {lam: {} for lam in weights}
    mean_row, shared_rows, raw_rows = mean_row.float(), shared_rows.float(), raw_rows.float()
    for s in range(0, hidden.shape[0], chunk):
        h, g = hidden[s:s + chunk].float(), gold[s:s + chunk]
        g_kind, g_where = kind[g], where[g]
        at_mean = h @ mean_row  # [c]
        shared = apply_softcap(h @ shared_rows.T, softcap)  # [c, S], the same at every lam
        lz_shared = torch.logsumexp(shared, 1)
        capped_mean = apply_softcap(at_mean, softcap)
        lz_other = capped_mean + math.log(n_other) if n_other else torch.full_like(at_mean, -math.inf)
        gold_shared = shared.gather(1, g_where.clamp_max(max(n_shared - 1, 0)).unsqueeze(1)
                                    ).squeeze(1) if n_shared else at_mean
        towards_raw = h @ raw_rows.T - at_mean.unsqueeze(1)  # [c, N]
        for lam in weights:
            new = apply_softcap(towards_raw * lam + at_mean.unsqueeze(1), softcap)
            lz_new = torch.logaddexp(torch.logsumexp(new, 1), lz_other)
            logz = torch.logaddexp(lz_shared, lz_new)
            gold_new = (new.gather(1, g_where.clamp_max(n_new - 1).unsqueeze(1)).squeeze(1)
                        if n_new else capped_mean)
            lp = torch.where(g_kind == 0, gold_shared,
                             torch.where(g_kind == 1, gold_new, capped_mean)) - logz
            new_gold = g_kind != 0
            part = {"leak": float((lz_new - logz)[~new_gold].exp().double().sum()),
                    "nll_shared": float(-lp[~new_gold].double().sum()),
                    "nll_new": float(-lp[new_gold].double().sum()),
                    "n_shared": int((~new_gold).sum()), "n_new": int(new_gold.sum())}
            for key, value in part.items():
                totals[lam][key] = totals[lam].get(key, 0) + value
    return totals
