"""EVA — Explained Variance Adaptation, Paischer et al. 2024, https://arxiv.org/abs/2410.07170

    y' = y + s · (x Aᵀ) Bᵀ,   s = alpha / r,   A (r, d_in) = top-r right singular vectors of X,  B (d_out, r) = 0

X (N, d_in) stacks the layer's inputs at every non-padding position of the calibration data, so
A starts on the directions that carry most of the energy the layer actually receives. A is
trainable, B = 0 makes init exactly the identity. Calibration is required: attach without
``calibration_data`` fails before touching the model.

Statistics are streamed, never stored: each batch's rows (from ``ll.stream_inputs``, padding
already dropped) are folded into the second moment C = XᵀX (d_in × d_in, float64), and A is
the top-r eigenvectors of C, which are exactly the top-r right singular vectors of X. Memory is
one d_in × d_in matrix per target on the layer's device whatever N is (128 MiB at d_in = 4096),
one pass over the data, and the result is exact and independent of batch order. (An incremental SVD would keep only r ×
d_in per target but is approximate: PEFT's truncates to r components after every batch, draws a randomized
low-rank SVD, and loops over the data until the components stop moving.) Consecutive targets
fed the same tensor (q/k/v, gate/up) reuse one product XᵀX per batch.

Deliberate difference from PEFT: X is *uncentred* by default. The adapter acts on x itself,
mean included, and the top eigenvectors of E[xxᵀ] are the directions along which ‖A x‖ is
largest. PEFT's IncrementalPCA subtracts the mean (principal components of the covariance);
``center=True`` does the same (C = XᵀX − N μμᵀ) and then spans PEFT's subspace (tests: PEFT's
default init agrees to 0.996 in mean cos² of the principal angles; made exact, with one batch
and a full SVD, its A equals ours to 3e-7). lora-lite gives every target the same rank r
(PEFT's rho=1), with no whitening.
Rows of A are sign-normalised (largest |entry| positive) so the init is deterministic.

Interop: after init EVA is a LoRA (the base is never rewritten): merges to W + s·B A and
exports to PEFT as a plain LoRA folder (init_lora_weights=True: it loads onto the unmodified
base). ``peft_init`` runs PEFT's own EVA init on a PEFT model (for comparisons).
"""
from dataclasses import dataclass

import torch

import lora_lite as ll


@dataclass
class EVAConfig(ll.AdapterConfig):
    variant: str = "eva"
    center: bool = False  # subtract the input mean first (principal components, as PEFT)


class Moments:
    """Running XᵀX, Σx and row count of one layer's inputs: O(d_in²) memory for any N."""

    def __init__(self, d_in, device):
        dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        self.xtx = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.sum = torch.zeros(d_in, dtype=dtype, device=device)
        self.count = 0

    def add(self, rows, product):  # rows (n, d_in) fp32, product = rowsᵀ rows (d_in, d_in)
        self.xtx += product.to(self.xtx.dtype)
        self.sum += rows.sum(dim=0).to(self.sum.dtype)
        self.count += rows.shape[0]

    def finite(self) -> bool:
        return bool(torch.isfinite(self.xtx).all() and torch.isfinite(self.sum).all())

    def top_directions(self, r, center):
        c = self.xtx
        if center:
            c = c - torch.outer(self.sum, self.sum) / self.count
        _, vectors = torch.linalg.eigh(c)           # ascending eigenvalues
        top = vectors[:, -r:].flip(-1).T              # (r, d_in), orthonormal rows
        peak = top.abs().argmax(dim=1, keepdim=True)
        return top * top.gather(1, peak).sign()


def check_finite(stats, targets):
    """Refuse (before any tensor is set) calibration inputs holding NaN or Inf."""
    bad = [t.name for t in targets if not stats[t.name].finite()]
    if bad:
        raise ll.AttachError(
            f"eva: the calibration inputs of {bad[0]} ({len(bad)} of {len(targets)} targets) hold "
            "NaN or Inf values, so no directions can be found; check the base model and the "
            "calibration batches (e.g. run in float32). The model was not changed")


class EVA(ll.Variant):
    name = "eva"
    config = EVAConfig
    needs_calibration = True
    paper = "https://arxiv.org/abs/2410.07170"
    train_defaults = {"calibration": 4}   # A from the activations of 4 batches

    def added_macs(target, cfg):
        return cfg.r * (target.d_in + target.d_out), 0

    def param_specs(d_in, d_out, cfg):
        return {
            "lora_A": ll.ParamSpec((cfg.r, d_in), init="zeros"),  # set by group_init (or load)
            "lora_B": ll.ParamSpec((d_out, cfg.r), init="zeros"),
        }

    def group_init(model, targets, cfg, calibration_data):
        if calibration_data is None:
            raise ValueError("eva initialises A from data: pass calibration_data=[batch, ...]")
        too_wide = [t.name for t in targets if cfg.r > t.d_in]
        if too_wide:
            raise ValueError(f"r={cfg.r} exceeds d_in of {too_wide[0]}: EVA's A has at most "
                             "d_in orthonormal rows; lower r")
        stats = {t.name: None for t in targets}
        previous = {}  # the last call within the current batch: (rows, product)

        def on_rows(target, rows):
            last = previous.get("call")
            if last is not None and last[0].shape == rows.shape and torch.equal(last[0], rows):
                product = last[1]  # same input as the previous target: same XᵀX
            else:
                product = rows.T @ rows  # (d_in, d_in), fp32 per batch, summed in float64
            previous["call"] = (rows, product)
            if stats[target.name] is None:
                stats[target.name] = Moments(target.d_in, rows.device)
            stats[target.name].add(rows, product)

        def batches():
            for batch in calibration_data:
                previous.clear()  # do not compare across batches, do not keep old rows alive
                yield batch
            previous.clear()

        ll.stream_inputs(model, targets, batches(), on_rows)
        for t in targets:
            seen = stats[t.name].count if stats[t.name] is not None else 0
            if seen < cfg.r:
                raise ValueError(f"{t.name} saw {seen} non-padding input rows in the calibration "
                                 f"data, EVA needs at least r={cfg.r}: pass more (or longer) batches")
        check_finite(stats, targets)
        for t in targets:
            top = stats.pop(t.name).top_directions(cfg.r, cfg.center)
            with torch.no_grad():
                t.layer.lora_A.copy_(top.to(t.layer.lora_A.dtype))

    def forward(layer, x, y, cfg):
        # x: (..., d_in) in cfg.dtype; y: (..., d_out) base output
        delta = (x @ layer.lora_A.T) @ layer.lora_B.T  # (..., d_out)
        return y + cfg.scale * delta.to(y.dtype)

    def merged_weight(layer, cfg):
        W = ll.dense_weight(layer)                                   # (d_out, d_in) fp32
        return W + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float()), None

    def peft_config(cfg, target_names):
        return ll.peft_lora_config(target_names, cfg.r, cfg.alpha)  # plain init: loads on W

    def peft_state(layer, cfg):
        return {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}

    def from_peft(peft_config):
        return None  # PEFT's EVA adapters are LoRA weights: the lora variant imports them

    def peft_init(peft_model, calibration_data):
        """PEFT's EVA init (rho = 1: every target keeps rank r) on a PEFT LoRA model."""
        from peft import EvaConfig
        from peft.tuners.lora import initialize_lora_eva_weights
        config = peft_model.peft_config[peft_model.active_adapter]
        config.init_lora_weights = "eva"
        config.eva_config = config.eva_config or EvaConfig(rho=1.0)
        initialize_lora_eva_weights(peft_model, dataloader=calibration_data)
