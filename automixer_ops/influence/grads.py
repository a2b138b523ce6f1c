"""Per-sample gradient statistics of the input-embedding and output layers, many samples at once.

For a batch of samples (right-padded token sequences with a per-token loss weight) one
forward pass and one activation-only backward pass give everything DataInf needs about
each sample's gradient g_i, without ever materialising g_i for the whole batch:

* output layer W (V x H), logits z_t = W h_t: g_i = sum_t e_t (w_t h_t)^T with the softmax
  residual e_t = softmax(z_t) - onehot(y_t), the loss weight w_t and the final hidden state
  h_t (the weight rides on the (N, H) side: scaling the (N, V) residual costs a sweep of it);
* input embedding E (V x H): g_i = sum_t onehot(x_t) delta_t^T, where delta_t is the
  gradient of the sample's loss at the embedding output of position t: one backward pass
  through the body to the inputs (no weight gradients), grouped by token id;
* tied embeddings (E is W): one layer whose gradient is the sum of both uses.

`BatchGrads` then gives per sample: dot products with any layer-shaped matrix (v or r),
squared norms (the output part either built per sample in vocabulary chunks, or in the
Gram "ghost" form sum((E E^T) * (H H^T)), whichever costs fewer FLOPs for that sample's
length), and weighted sums sum_i c_i g_i (several coefficient vectors at once) into fp64
accumulators. Where a sample's output-layer gradient was built whole for its norm, it can
be kept (`keep=`) so that the weighted sums are a (K, B) x (B, V H) product, and later dots
V H multiply-adds a sample, instead of passes over the (N, V) residual.

Only Llama-style heads are supported: logits = W h with no bias, scaling or soft-capping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from automixer_ops.errors import AutomixerError

EMBED, OUTPUT, TIED = "embed", "output", "tied"
# Elements of one chunk of a per-sample output-layer gradient (bounded memory for big vocabularies).
CHUNK_ELEMENTS = 1 << 23
# Elements of one row block of the softmax (8 MB in fp32: stays in cache while it is normalised).
SOFTMAX_BLOCK_ELEMENTS = 1 << 21
# Elements of the per-sample output-layer gradients a batch may keep for its weighted sums (1 GiB fp32).
KEEP_ELEMENTS = 1 << 28
# Kept gradients multiplied by a layer-shaped matrix at a time, for their dots (a product that stays in cache).
KEPT_DOT_ROWS = 4


class Workspace:
    """Reusable buffers for a loop that builds one `BatchGrads` at a time (a streamed pass).

    On CPU a fresh buffer of the batch's size (the (N, V) residual: 256 MB for 8192 tokens at vocabulary
    8192) costs about as much in page faults as the matmul that fills it. A `BatchGrads` built on a
    workspace is overwritten by the next one built on it: keep none across iterations.
    """

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            buf = self._bufs[name] = torch.empty(n, device=device)
        return buf[:n].view(shape)


def _buffer(workspace: Workspace | None, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
    return workspace.take(name, shape, device) if workspace is not None else torch.empty(shape, device=device)


def layer_weights(model) -> dict[str, torch.Tensor]:
    """The scored layers by name: {'embed', 'output'}, or {'tied'} when they share one matrix."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None:
        raise AutomixerError("the model has no output layer (get_output_embeddings() is None)")
    if getattr(head, "bias", None) is not None:
        raise AutomixerError("output layers with a bias are not supported (Llama-style heads only)")
    if head.weight is emb or head.weight.data_ptr() == emb.data_ptr():
        return {TIED: emb}
    return {EMBED: emb, OUTPUT: head.weight}


def check_plain_head(model) -> None:
    """Raise unless the model's logits are W h of its final hidden states, as every formula here assumes: a
    head that scales or soft-caps its logits (Gemma 2, Cohere) would be scored wrongly and without a sign."""
    layer_weights(model)  # a missing head or a bias: its own error
    w = model.get_output_embeddings().weight
    ids = (torch.arange(8, device=w.device) * 7 % w.shape[0])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        plain = model.base_model(input_ids=ids).last_hidden_state.float() @ w.float().T
    if not torch.allclose(logits, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max())):
        raise AutomixerError(f"{type(model).__name__}: its logits are not the output layer times the final hidden "
                             "states (a logit scale or soft-capping?); only Llama-style heads can be scored")


@dataclass
class Batch:
    """Right-padded samples. `loss_weight[b, t]` weights the prediction of token t+1 at position t
    (1/n for a sample's n predicted tokens; 0 on padding and on unscored context)."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    loss_weight: torch.Tensor  # (B, T) float32

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_weight.to(device))

    def select(self, rows: torch.Tensor) -> "Batch":
        """The samples at `rows` (indices or a bool mask), with the padding no longer needed cut off."""
        mask = self.attention_mask[rows]
        width = int(mask.sum(1).max()) if len(mask) else 0
        return Batch(self.input_ids[rows, :width], mask[:, :width], self.loss_weight[rows, :width])


class BatchGrads:
    """The residuals, hidden states and embedding-output gradients of one batch (see module doc)."""

    def __init__(self, model, batch: Batch, autocast_dtype: torch.dtype | None = None,
                 project: tuple[torch.Tensor, ...] = (), workspace: Workspace | None = None):
        """`project`: layer-shaped matrices m whose output-layer dots will be asked for (e.g. r); their
        e_t.m products are formed in the same matmul as the backward through the output layer.
        `workspace`: where the (N, V) residual goes (streamed passes; see `Workspace`)."""
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
        # Softmax residual e_t = p_t - onehot(y_t), unweighted: the loss weight goes on h, every output-layer
        # quantity pairing e_t with h_t. release_residual() drops it; it is then recomputed from h when needed.
        self._w, self._h_raw, self._targets, self._workspace = w, h, targets, workspace
        resid = self._softmax(h)
        self.loss_per_sample = self._sample_sum(-weight * resid[rows, targets].log())
        resid[rows, targets] -= 1.0
        self.resid, self.h = resid, h * weight[:, None]

        mats = [w] + [m.float() for m in project]
        proj = resid @ (torch.cat(mats, 1) if len(mats) > 1 else w)  # e_t W and e_t m: one matmul
        self._projected = {m.data_ptr(): proj[:, (i + 1) * self.hidden:(i + 2) * self.hidden]
                           for i, m in enumerate(project)}
        grad_out = proj[:, :self.hidden] * weight[:, None]

        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[b_idx, t_idx] = grad_out.to(hidden.dtype)
        (delta,) = torch.autograd.grad(hidden, x, grad_hidden)
        # delta at every real position, including unscored context that later positions attend to
        real = mask.bool()
        self.e_b, e_t = real.nonzero(as_tuple=True)
        self.delta = delta[self.e_b, e_t].float()  # (M, H)
        self.e_tok = ids[self.e_b, e_t]
        self._groups = None
        self._kept = None  # (samples, V H): output-layer gradients kept by sq_norms_and_dots(keep=...)
        self._kept_of = None  # (samples,) int64: the sample of each kept row

    # ---------------------------------------------------------------- helpers

    def _softmax(self, h: torch.Tensor) -> torch.Tensor:
        """softmax(h W^T) into the workspace's (or a new) (N, V) buffer, the batch's largest. It runs in row
        blocks that stay in cache: about 2x faster on CPU than a whole-buffer softmax (a second (N, V)
        buffer) or separate max/exp/sum/divide sweeps over the whole buffer."""
        p = torch.mm(h, self._w.T, out=_buffer(self._workspace, "resid", (len(h), self.vocab), h.device))
        for block in p.split(max(1, SOFTMAX_BLOCK_ELEMENTS // self.vocab)):
            block.copy_(torch.softmax(block, -1))
        return p

    def _residual(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """e_t for all predicted rows, or for `rows` (a bool mask): kept, or recomputed after release_residual()."""
        if self.resid is not None:
            return self.resid if rows is None else self.resid[rows]
        h, targets = (self._h_raw, self._targets) if rows is None else (self._h_raw[rows], self._targets[rows])
        e = self._softmax(h)
        e[torch.arange(len(h), device=h.device), targets] -= 1.0
        return e

    def _rows_of(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """e_t, the weighted h_t and the sample of each predicted row of `samples` (a (B,) bool mask)."""
        rows = samples[self.sample_of_row]
        if bool(rows.all()):
            return self._residual(), self.h, self.sample_of_row
        return self._residual(rows), self.h[rows], self.sample_of_row[rows]

    def release_residual(self) -> None:
        """Frees the (N, V) residual (tokens x vocabulary floats) of a BatchGrads that is kept for later
        dots / accumulate: they recompute it from the kept hidden states (one (N, H) x (H, V) product) into
        the workspace given at construction. What stays is about tokens x 4 hidden floats (and the kept
        output-layer gradients, if any)."""
        self.resid, self._projected = None, {}

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
        return self._sq_norms(mode, None, None)[0]

    def sq_norms_and_dots(self, mats: dict[str, torch.Tensor], mode: str = "auto",
                          keep: Workspace | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """sq_norms(mode) and dots(mats) at once (pass 1, mats = v). Where a sample's output-layer gradient
        is built explicitly for its norm, its dot with the output part of mats is read off that gradient
        (V H multiply-adds per sample) instead of dots()'s (N, V) x (V, H) product over the batch.

        keep: where a sample's output-layer gradient is built whole (it fits one chunk), keep it in a buffer
        of this workspace for `accumulate` and `dots` (which then need no pass over the residual); a
        workspace shared by a loop's batches is reused by the next one, so call `drop_kept()` once the sums
        are made."""
        out = next(((k, m) for k, m in mats.items() if k in (OUTPUT, TIED)), None)
        sq, out_dot = self._sq_norms(mode, None if out is None else out[1].float(), keep)
        return sq, self._dots(mats, {} if out is None else {out[0]: out_dot})

    def kept_elements(self) -> int:
        return 0 if self._kept is None else self._kept.numel()

    def drop_kept(self) -> None:
        self._kept, self._kept_of = None, None

    def _dots(self, mats: dict[str, torch.Tensor], known_out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """dots(); known_out: output-layer parts already computed, by layer name."""
        out = {}
        for name, m in mats.items():
            m = m.float()
            total = torch.zeros(self.B, device=self.h.device)
            if name in known_out:
                total += known_out[name]
            elif name in (OUTPUT, TIED):
                total += self._output_dots(m, self._projected.get(mats[name].data_ptr()))
            if name in (EMBED, TIED):
                total += self._sample_sum((m[self.e_tok] * self.delta).sum(-1), self.e_b)
            out[name] = total
        return out

    def _output_dots(self, m: torch.Tensor, projected: torch.Tensor | None) -> torch.Tensor:
        """<m, output part of g_i> per sample: from the kept gradients where they exist, else from the residual
        as e_t . (m h_t) = (e_t m) . h_t (`projected`: e m, when formed with e W)."""
        if projected is not None:
            return self._sample_sum((projected * self.h).sum(-1))
        dev = self.h.device
        out, rest = torch.zeros(self.B, device=dev), torch.ones(self.B, dtype=torch.bool, device=dev)
        if self._kept is not None:
            out[self._kept_of] = self._kept_dots(m)
            rest[self._kept_of] = False
        if bool(rest.any()):
            e, h, s = self._rows_of(rest)
            out += self._sample_sum(((e @ m) * h).sum(-1), s)
        return out

    def _kept_dots(self, m: torch.Tensor) -> torch.Tensor:
        """<m, kept gradient> per kept row. By multiply and sum (torch's cascaded fp32 sum), not a BLAS dot:
        r . g_i cancels over its V H products and a dot's running fp32 sums lose digits (docs/influence.md)."""
        m = m.reshape(-1)
        return torch.cat([(part * m).sum(-1) for part in self._kept.split(KEPT_DOT_ROWS)])

    def _sq_norms(self, mode: str, m_out: torch.Tensor | None,
                  keep: Workspace | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """sq_norms(mode), and with m_out (output-layer shaped) each sample's <m_out, output part of g_i>;
        keep: see sq_norms_and_dots."""
        out_sq = torch.zeros(self.B, device=self.h.device)
        out_dot = None if m_out is None else torch.zeros(self.B, device=self.h.device)
        size, step = self.vocab * self.hidden, max(1, CHUNK_ELEMENTS // self.hidden)
        explicit = [n > 0 and (mode == "explicit" or (mode == "auto" and self.vocab * self.hidden * (n + 1) <=
                                                       n * n * (self.vocab + self.hidden)))  # vs the ghost form
                    for n in self.row_counts]
        # Sized for the samples it will hold: a kept view of a larger buffer would hold all of it.
        slots = min(sum(explicit), KEEP_ELEMENTS // size) if keep is not None and step >= self.vocab else 0
        kept = _buffer(keep, "kept", (slots, size), self.h.device) if slots else None
        kept_of, resid = [], self._residual()
        for b, seg in self._segments():
            if seg.stop == seg.start:
                continue
            e, h = resid[seg], self.h[seg]
            if explicit[b]:
                for lo in range(0, self.vocab, step):
                    if len(kept_of) < slots:  # the whole gradient, kept for accumulate and dots
                        g = torch.mm(e.T, h, out=kept[len(kept_of)].view(self.vocab, self.hidden)).view(-1)
                        kept_of.append(b)
                    else:
                        g = (e[:, lo:lo + step].T @ h).view(-1)
                    out_sq[b] += g.dot(g)  # no (V, H) temporary for g * g
                    if m_out is not None:  # multiply and sum, not dot: see _kept_dots
                        out_dot[b] += (g * m_out[lo:lo + step].reshape(-1)).sum()
            else:
                out_sq[b] = ((e @ e.T) * (h @ h.T)).sum()
                if m_out is not None:
                    out_dot[b] = ((e @ m_out) * h).sum()
        self._kept = kept[:len(kept_of)] if kept_of else None
        self._kept_of = torch.tensor(kept_of, device=self.h.device) if kept_of else None
        s_b, _, rows = self._embedding_rows()
        emb_sq = self._sample_sum((rows * rows).sum(-1), s_b)
        if EMBED in self.layers:
            return {EMBED: emb_sq, OUTPUT: out_sq}, out_dot
        return {TIED: emb_sq + out_sq + 2 * self._tied_cross()}, out_dot

    def _tied_cross(self) -> torch.Tensor:
        """<embedding part, output part> of each sample's tied gradient: only its own tokens' rows meet."""
        s_b, s_tok, rows = self._embedding_rows()
        cross, resid = torch.zeros(self.B, device=self.h.device), self._residual()
        for b, seg in self._segments():
            sel = s_b == b
            if seg.stop == seg.start or not bool(sel.any()):
                continue
            out_rows = resid[seg][:, s_tok[sel]].T @ self.h[seg]  # output gradient at those tokens
            cross[b] = (out_rows * rows[sel]).sum()
        return cross

    def accumulate(self, coeff: torch.Tensor, acc: dict[str, torch.Tensor]) -> None:
        """acc_l += sum_i coeff_i * g_il (acc in fp64; the batch's sum is formed in fp32).

        coeff (B,) with layer-shaped acc_l, or (K, B) with acc_l of shape (K, *layer): K sums at once.
        Samples whose coefficients are all zero cost nothing."""
        c = coeff.to(self.h.device, torch.float32).reshape(-1, self.B)
        K = len(c)
        for name, a in acc.items():
            part = torch.zeros((K, *a.shape[-2:]), dtype=torch.float32, device=self.h.device)
            if name in (OUTPUT, TIED):
                self._accumulate_output(c, part.view(K, -1))
            if name in (EMBED, TIED):
                for k in range(K):
                    part[k].index_add_(0, self.e_tok, self.delta * c[k, self.e_b, None])
            a.view(part.shape).add_(part.to(a.device, a.dtype))

    def _accumulate_output(self, c: torch.Tensor, out: torch.Tensor) -> None:
        """out (K, V H) += sum_i c_ki g_i(output part): kept gradients by one product, the rest from e and h."""
        rest = (c != 0).any(0)
        if self._kept is not None:
            out += c[:, self._kept_of] @ self._kept
            rest[self._kept_of] = False
        if not bool(rest.any()):
            return
        e, h, s = self._rows_of(rest)
        # sum_t c_t e_t h_t^T with c_t on the (N, H) side: scaling e instead would write an (N, V) copy
        # (2x slower at vocabulary 8192). The K sums share one pass over e.
        hc = (c.T[s][:, :, None] * h[:, None, :]).reshape(len(h), -1)  # (N, K H)
        out += (e.T @ hc).view(self.vocab, len(c), self.hidden).transpose(0, 1).reshape(len(c), -1)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
