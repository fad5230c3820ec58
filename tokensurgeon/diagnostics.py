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

from tokensurgeon.logits import LOGIT_CHUNK, apply_softcap, decoder_and_head, final_hidden_states

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


def text_windows(tokenizer, text: str, window: int = 1024) -> list[torch.Tensor]:
    """``text`` as token-id windows of at most ``window`` + 1 ids, each starting with the
    tokenizer's BOS (or EOS, for tokenizers without one)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [torch.tensor([prefix] + ids[s:s + window]) for s in range(0, len(ids), window)]


def add_sums(total: dict, part: dict) -> None:
    """``total[key] += part[key]`` for every key (sums of :func:`logit_stats`)."""
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def leak_on_text(model, tokenizer, is_new: torch.Tensor, text: str = BUILTIN_TEXT,
                 chunk: int = LOGIT_CHUNK) -> dict:
    """Leak mass (mean over shared-gold positions) and bits per byte split by gold kind, on
    ``text`` (:func:`text_windows`: BOS or EOS first)."""
    _, head_module, softcap = decoder_and_head(model)
    head = head_module.weight.detach()
    total: dict = {}
    with torch.inference_mode():
        for ids in text_windows(tokenizer, text):
            batch = ids.unsqueeze(0)
            hidden = final_hidden_states(model, batch, torch.ones_like(batch))[0, :-1]
            for s in range(0, hidden.shape[0], chunk):
                add_sums(total, leak_stats(hidden[s:s + chunk], head, ids[1:][s:s + chunk],
                                           is_new.to(head.device), softcap))
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
                         chunk: int = LOGIT_CHUNK) -> dict[float, dict]:
    """Loss and leak of every candidate output matrix ``W(lam)``, from one set of hidden states.

    ``W(lam)`` holds ``shared_rows`` at ``shared_ids``, ``mean + lam * (raw - mean)`` at
    ``new_ids`` and ``mean_row`` at every other id (tokens without a row of their own). Its
    logits are ``h . mean + lam * (h . raw - h . mean)`` on the new ids, so one product per
    row set serves every ``lam``; no candidate matrix is built, only each chunk's logits
    [chunk, V], scored by :func:`logit_stats`.

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
    is_new = torch.ones(vocab_size, dtype=torch.bool)  # "new": every id outside shared_ids
    is_new[shared_ids] = False
    totals: dict[float, dict] = {lam: {} for lam in weights}
    mean_row, shared_rows, raw_rows = mean_row.float(), shared_rows.float(), raw_rows.float()
    for s in range(0, hidden.shape[0], chunk):
        h, g = hidden[s:s + chunk].float(), gold[s:s + chunk]
        at_mean = (h @ mean_row).unsqueeze(1)  # [c, 1]: every id without a row of its own
        shared = h @ shared_rows.T  # [c, S], the same at every lam
        towards_raw = h @ raw_rows.T - at_mean  # [c, N]
        for lam in weights:
            logits = at_mean.expand(-1, vocab_size).clone()  # [c, V]
            logits[:, shared_ids] = shared
            logits[:, new_ids] = at_mean + lam * towards_raw
            add_sums(totals[lam], logit_stats(apply_softcap(logits, softcap), g, is_new))
    return totals
