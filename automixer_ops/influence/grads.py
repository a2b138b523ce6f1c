"""Per-sample gradient statistics of the input-embedding and output layers, many samples at once.

For a batch of samples (right-padded token sequences with a per-token loss weight) one
forward pass and one activation-only backward pass give everything DataInf needs about
each sample's gradient g_i, without ever materialising g_i for the whole batch:

* output layer W (V x H), logits z_t = W h_t: g_i = sum_t e_t h_t^T with the softmax
  residual e_t = w_t (softmax(z_t) - onehot(y_t)) and the final hidden state h_t;
* input embedding E (V x H): g_i = sum_t onehot(x_t) delta_t^T, where delta_t is the
  gradient of the sample's loss at the embedding output of position t: one backward pass
  through the body to the inputs (no weight gradients), grouped by token id;
* tied embeddings (E is W): one layer whose gradient is the sum of both uses.

`BatchGrads` then gives per sample: dot products with any layer-shaped matrix (v or r),
squared norms (the output part either built per sample in vocabulary chunks, or in the
Gram "ghost" form sum((E E^T) * (H H^T)), whichever costs fewer FLOPs for that sample's
length), and the weighted sum sum_i c_i g_i into fp64 accumulators.

Only Llama-style heads are supported: logits = W h with no bias, scaling or soft-capping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMBED, OUTPUT, TIED = "embed", "output", "tied"
# Elements of one chunk of a per-sample output-layer gradient (bounded memory for big vocabularies).
CHUNK_ELEMENTS = 1 << 23
# Elements of one row block of the softmax (8 MB in fp32: stays in cache while it is normalised).
SOFTMAX_BLOCK_ELEMENTS = 1 << 21


def layer_weights(model) -> dict[str, torch.Tensor]:
    """The scored layers by name: {'embed', 'output'}, or {'tied'} when they share one matrix."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output layer (get_output_embeddings() is None)")
    if getattr(head, "bias", None) is not None:
        raise ValueError("output layers with a bias are not supported (Llama-style heads only)")
    if head.weight is emb or head.weight.data_ptr() == emb.data_ptr():
        return {TIED: emb}
    return {EMBED: emb, OUTPUT: head.weight}


@dataclass
class Batch:
    """Right-padded samples. `loss_weight[b, t]` weights the prediction of token t+1 at position t
    (1/n for a sample's n predicted tokens; 0 on padding and on unscored context)."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    loss_weight: torch.Tensor  # (B, T) float32

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_weight.to(device))


class BatchGrads:
    """The residuals, hidden states and embedding-output gradients of one batch (see module doc)."""

    def __init__(self, model, batch: Batch, autocast_dtype: torch.dtype | None = None,
                 project: tuple[torch.Tensor, ...] = ()):
        """`project`: layer-shaped matrices m whose output-layer dots will be asked for (e.g. r); their
        e_t.m products are formed in the same matmul as the backward through the output layer."""
        self.layers = layer_weights(model)
        emb_w = model.get_input_embeddings().weight
        out_w = model.get_output_embeddings().weight
        self.vocab, self.hidden = out_w.shape
        ids, mask = batch.input_ids, batch.attention_mask
        self.B, self.T = ids.shape

        # Predicted positions in row-major order: rows of the same sample are contiguous.
        pred = batch.loss_weight[:, :-1] != 0
        b_idx, t_idx = pred.nonzero(as_tuple=True)
        self.sample_of_row = b_idx
        self.row_counts = torch.bincount(b_idx, minlength=self.B).tolist()
        targets = ids[b_idx, t_idx + 1]
        rows = torch.arange(len(targets), device=ids.device)
        weight = batch.loss_weight[b_idx, t_idx]

        x = emb_w.detach()[ids].requires_grad_(True)  # (B, T, H) embedding outputs
        ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else _Null()
        with torch.enable_grad(), ctx:
            hidden = model.base_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        h = hidden.detach()[b_idx, t_idx].float()  # (N, H) final (normed) hidden states
        w = out_w.detach().float()
        # Softmax residual in place (the (N, V) buffer is the batch's largest): e_t = w_t (p_t - onehot(y_t)).
        # The softmax runs in row blocks that stay in cache: about 2x faster on CPU than a whole-buffer
        # softmax (a second (N, V) buffer) or separate max/exp/sum/divide sweeps over the whole buffer.
        resid = h @ w.T
        for block in resid.split(max(1, SOFTMAX_BLOCK_ELEMENTS // self.vocab)):
            block.copy_(torch.softmax(block, -1))
        log_p_target = resid[rows, targets].log()
        self.loss_per_sample = self._sample_sum(-weight * log_p_target)
        resid[rows, targets] -= 1.0
        resid.mul_(weight[:, None])
        self.resid, self.h = resid, h  # e_t (N, V) and h_t (N, H)

        mats = [w] + [m.float() for m in project]
        proj = resid @ (torch.cat(mats, 1) if len(mats) > 1 else w)  # e_t W and e_t m: one matmul
        self._projected = {m.data_ptr(): proj[:, (i + 1) * self.hidden:(i + 2) * self.hidden]
                           for i, m in enumerate(project)}
        grad_out = proj[:, :self.hidden]

        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[b_idx, t_idx] = grad_out.to(hidden.dtype)
        (delta,) = torch.autograd.grad(hidden, x, grad_hidden)
        # delta at every real position, including unscored context that later positions attend to
        real = mask.bool()
        self.e_b, e_t = real.nonzero(as_tuple=True)
        self.delta = delta[self.e_b, e_t].float()  # (M, H)
        self.e_tok = ids[self.e_b, e_t]
        self._groups = None

    # ---------------------------------------------------------------- helpers

    def _sample_sum(self, per_row: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        index = self.sample_of_row if index is None else index
        return torch.zeros(self.B, dtype=per_row.dtype, device=per_row.device).index_add_(0, index, per_row)

    def _embedding_rows(self):
        """Each sample's embedding gradient as rows of its distinct tokens: (sample, token, row)."""
        if self._groups is None:
            key = self.e_b * self.vocab + self.e_tok
            uniq, inv = torch.unique(key, return_inverse=True)
            rows = torch.zeros(len(uniq), self.hidden, device=self.delta.device).index_add_(0, inv, self.delta)
            self._groups = (uniq // self.vocab, uniq % self.vocab, rows)
        return self._groups

    def _segments(self):
        start = 0
        for b, n in enumerate(self.row_counts):
            yield b, slice(start, start + n)
            start += n

    # ---------------------------------------------------------------- statistics

    def dots(self, mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per sample and layer: <m_l, g_il> for layer-shaped matrices m_l (e.g. v or r). (B,) each."""
        return self._dots(mats, {})

    def sq_norms(self, mode: str = "auto") -> dict[str, torch.Tensor]:
        """Per sample and layer: ||g_il||^2. mode: 'auto' | 'explicit' | 'ghost' (output part)."""
        return self._sq_norms(mode, None)[0]

    def sq_norms_and_dots(self, mats: dict[str, torch.Tensor],
                          mode: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """sq_norms(mode) and dots(mats) at once (pass 1, mats = v). Where a sample's output-layer gradient
        is built explicitly for its norm, its dot with the output part of mats is read off that gradient
        (V H multiply-adds per sample) instead of dots()'s (N, V) x (V, H) product over the batch."""
        out = next(((k, m) for k, m in mats.items() if k in (OUTPUT, TIED)), None)
        sq, out_dot = self._sq_norms(mode, None if out is None else out[1].float())
        return sq, self._dots(mats, {} if out is None else {out[0]: out_dot})

    def _dots(self, mats: dict[str, torch.Tensor], known_out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """dots(); known_out: output-layer parts already computed, by layer name."""
        out = {}
        for name, m in mats.items():
            m = m.float()
            total = torch.zeros(self.B, device=self.h.device)
            if name in known_out:
                total += known_out[name]
            elif name in (OUTPUT, TIED):
                em = self._projected.get(mats[name].data_ptr())
                em = self.resid @ m if em is None else em  # e_t . (m h_t) = (e_t m) . h_t
                total += self._sample_sum((em * self.h).sum(-1))
            if name in (EMBED, TIED):
                total += self._sample_sum((m[self.e_tok] * self.delta).sum(-1), self.e_b)
            out[name] = total
        return out

    def _sq_norms(self, mode: str, m_out: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """sq_norms(mode), and with m_out (output-layer shaped) each sample's <m_out, output part of g_i>."""
        out_sq = torch.zeros(self.B, device=self.h.device)
        out_dot = None if m_out is None else torch.zeros(self.B, device=self.h.device)
        for b, seg in self._segments():
            n = seg.stop - seg.start
            if n == 0:
                continue
            e, h = self.resid[seg], self.h[seg]
            explicit_cost = self.vocab * self.hidden * (n + 1)
            ghost_cost = n * n * (self.vocab + self.hidden)
            if mode == "explicit" or (mode == "auto" and explicit_cost <= ghost_cost):
                step = max(1, CHUNK_ELEMENTS // self.hidden)
                for lo in range(0, self.vocab, step):
                    g = (e[:, lo:lo + step].T @ h).view(-1)
                    out_sq[b] += g.dot(g)  # no (V, H) temporary for g * g
                    if m_out is not None:
                        out_dot[b] += g.dot(m_out[lo:lo + step].reshape(-1))
            else:
                out_sq[b] = ((e @ e.T) * (h @ h.T)).sum()
                if m_out is not None:
                    out_dot[b] = ((e @ m_out) * h).sum()
        s_b, _, rows = self._embedding_rows()
        emb_sq = self._sample_sum((rows * rows).sum(-1), s_b)
        if EMBED in self.layers:
            return {EMBED: emb_sq, OUTPUT: out_sq}, out_dot
        return {TIED: emb_sq + out_sq + 2 * self._tied_cross()}, out_dot

    def _tied_cross(self) -> torch.Tensor:
        """<embedding part, output part> of each sample's tied gradient: only its own tokens' rows meet."""
        s_b, s_tok, rows = self._embedding_rows()
        cross = torch.zeros(self.B, device=self.h.device)
        for b, seg in self._segments():
            sel = s_b == b
            if seg.stop == seg.start or not bool(sel.any()):
                continue
            out_rows = self.resid[seg][:, s_tok[sel]].T @ self.h[seg]  # output gradient at those tokens
            cross[b] = (out_rows * rows[sel]).sum()
        return cross

    def accumulate(self, coeff: torch.Tensor, acc: dict[str, torch.Tensor]) -> None:
        """acc_l += sum_i coeff_i * g_il (acc in fp64; the batch's sum is formed in fp32)."""
        coeff = coeff.to(self.h.device, torch.float32)
        for name, a in acc.items():
            part = torch.zeros(a.shape, dtype=torch.float32, device=self.h.device)
            if name in (OUTPUT, TIED):
                # sum_t c_t e_t h_t^T with c_t on the (N, H) side: scaling e instead would write an (N, V) copy
                # (2x slower at vocabulary 8192).
                part += self.resid.T @ (self.h * coeff[self.sample_of_row, None])
            if name in (EMBED, TIED):
                part.index_add_(0, self.e_tok, self.delta * coeff[self.e_b, None])
            a += part.to(a.device, a.dtype)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
