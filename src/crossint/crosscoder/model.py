"""The acausal crosscoder (SPEC §3): encode, sparse decode, normalisation folding, save and load.

Files: ``model.safetensors`` (the tensors below, by name) and ``config.json``
(``{"format": "crossint.crosscoder", "version": 1, "crosscoder": {...}, ...}``); a run
directory adds its training settings to the same ``config.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from crossint.crosscoder.activations import ACTIVATIONS, Activation, make_activation
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.sparse import decode_features
from crossint.errors import CrossintError
from crossint.io import atomic_write, atomic_write_json, read_json, sha256_file
from crossint.rundir import RunDir

if TYPE_CHECKING:
    from crossint.crosscoder.distributed import Ranks

__all__ = ["ACTIVATIONS", "Crosscoder", "CrosscoderConfig", "CrosscoderOutput"]

FORMAT = "crossint.crosscoder"
FORMAT_VERSION = 1
WEIGHTS_SHA256 = "weights_sha256"  # config.json: sha256 of model.safetensors


@dataclass
class CrosscoderOutput:
    """One forward pass. ``*_norm_*`` tensors are in normalised units (SPEC §3.4); the losses
    of SPEC §3.3 are computed there. After folding both units coincide."""

    recon_BXD: Tensor  # reconstruction in raw activation units
    f_BH: Tensor  # feature activations (exactly zero when inactive)
    pre_BH: Tensor  # pre-activations
    acts_norm_BXD: Tensor  # input · s_X
    recon_norm_BXD: Tensor  # reconstruction · s_X
    batch_threshold: Tensor | None = None  # BatchTopK training: smallest selected value (0-d)


class Crosscoder(nn.Module):
    """Acausal crosscoder over ``X = (models, hookpoints)`` positions (SPEC §3.1).

    Parameters ``W_enc_XDH``, ``W_dec_HXD``, ``b_enc_H``, ``b_dec_XD`` (frozen unless
    ``train_decoder_bias``; zero, or the activations' mean when ``center_inputs``); buffer
    ``scale_X`` (the normalisation s_X of SPEC §3.4, ones once folded). ``threshold_H`` is
    whatever the activation registers (crosscoder/activations.py): a learned parameter for
    JumpReLU, a buffer holding the running inference threshold θ for BatchTopK, an unused zero
    buffer for TopK and ReLU. ``activation`` is the :class:`Activation` that ``config.activation``
    names (rebuilt whenever ``config`` is assigned).
    """

    activation: Activation

    def __init__(self, config: CrosscoderConfig, seed: int = 0, ranks: Ranks | None = None) -> None:
        super().__init__()
        # Data-parallel training: the ranks that share each batch (BatchTopK selects across them).
        self.ranks = ranks
        self.config = config
        X, D, H = config.n_positions, config.d_model, config.n_features
        self.W_enc_XDH = nn.Parameter(torch.empty(X, D, H))
        self.W_dec_HXD = nn.Parameter(torch.empty(H, X, D))
        self.b_enc_H = nn.Parameter(torch.zeros(H))
        self.b_dec_XD = nn.Parameter(torch.zeros(X, D), requires_grad=config.train_decoder_bias)
        self.register_buffer("scale_X", torch.ones(X))
        self.activation.register_threshold(self)
        self.reset_parameters(seed)

    @property
    def config(self) -> CrosscoderConfig:
        return self._config

    @config.setter
    def config(self, config: CrosscoderConfig) -> None:
        self._config = config
        self.activation = make_activation(config, self.ranks)

    # --- structure -----------------------------------------------------------------------------
    @property
    def positions(self) -> list[tuple[str, str]]:
        """(model, hookpoint) of every X index, model-major."""
        return self.config.positions

    def position_index(self, hookpoint: str, model: str | None = None) -> int:
        """X index of ``hookpoint`` (of ``model``; may be omitted when there is one model)."""
        cfg = self.config
        if model is None:
            if cfg.n_models > 1:
                raise CrossintError(
                    f"this crosscoder spans models {cfg.models}; say which model's "
                    f"{hookpoint!r} you mean"
                )
            model = cfg.models[0]
        if model not in cfg.models:
            raise CrossintError(f"unknown model {model!r}: this crosscoder spans {cfg.models}")
        if hookpoint not in cfg.hookpoints:
            raise CrossintError(
                f"hookpoint {hookpoint!r} is not in this crosscoder; it reads {cfg.hookpoints}"
            )
        return cfg.models.index(model) * len(cfg.hookpoints) + cfg.hookpoints.index(hookpoint)

    def decoder(self, hookpoint: str, model: str | None = None) -> Tensor:
        """Decoder rows at one position, (H, D), always in raw activation units.

        Divides by s_x so that the same call serves a training (unfolded) crosscoder, e.g. for the
        interaction penalty, and a folded one (s_x = 1); gradients flow to ``W_dec_HXD``.
        """
        x = self.position_index(hookpoint, model)
        return self.W_dec_HXD[:, x, :] / self.scale_X[x]

    def decoders(self, hookpoints: list[str], model: str | None = None) -> list[Tensor]:
        """:meth:`decoder` for several positions from one gather: the backward then writes
        ``W_dec_HXD``'s gradient once, not once per position (an H×X×D buffer each time)."""
        index_P = torch.tensor(
            [self.position_index(name, model) for name in hookpoints],
            device=self.W_dec_HXD.device,
        )
        rows_HPD = self.W_dec_HXD.index_select(1, index_P) / self.scale_X[index_P][None, :, None]
        return list(rows_HPD.unbind(1))

    def decoder_bias(self, hookpoint: str, model: str | None = None) -> Tensor:
        """Decoder bias at one position, (D,), in raw activation units."""
        x = self.position_index(hookpoint, model)
        return self.b_dec_XD[x] / self.scale_X[x]

    # --- initialisation (SPEC §3.5) ------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Decoder rows: random directions of norm ``init_decoder_norm`` at every position;
        encoder = decoder transposed (tied init); biases zero. Drawn on the CPU from its own
        generator, so the init is identical on every device and leaves the global RNG alone."""
        generator = torch.Generator().manual_seed(seed)
        H, X, D = self.W_dec_HXD.shape
        dirs_HXD = torch.randn(H, X, D, generator=generator, dtype=torch.float64)
        dirs_HXD = dirs_HXD / dirs_HXD.norm(dim=-1, keepdim=True)
        W_dec_HXD = (self.config.init_decoder_norm * dirs_HXD).to(self.W_dec_HXD.dtype)
        self.W_dec_HXD.copy_(W_dec_HXD)
        self.W_enc_XDH.copy_(W_dec_HXD.permute(1, 2, 0))
        self.b_enc_H.zero_()
        self.b_dec_XD.zero_()

    @torch.no_grad()
    def calibrate_encoder_bias(self, acts_TXD: Tensor) -> Tensor:
        """SPEC §3.5: set b_enc so that each feature fires on ≈ k/H of the sample's tokens.

        Feature h's pre-activation without bias is shifted so that its (1 − k/H) quantile on the
        sample sits at the activation's firing level (its ``calibration_level``: 0, or the
        initial threshold for JumpReLU). Uses the current normalisation, so call it after
        ``estimate_normalisation``."""
        self._check_acts(acts_TXD)
        n = acts_TXD.shape[0]
        if n == 0:
            raise CrossintError("cannot calibrate the encoder bias on an empty sample")
        cfg = self.config
        pre_TH = self._pre_from_normalised(self.normalise(acts_TXD)) - self.b_enc_H
        # The k/H-th largest value of every column: kthvalue counts from the smallest.
        rank = min(n, max(1, round(n * (1 - cfg.k / cfg.n_features))))
        quantile_H = pre_TH.kthvalue(rank, dim=0).values
        self.b_enc_H.copy_(self.activation.calibration_level - quantile_H)
        return self.b_enc_H

    # --- forward (SPEC §3.1) -------------------------------------------------------------------
    def _check_acts(self, acts_BXD: Tensor) -> None:
        X, D = self.config.n_positions, self.config.d_model
        if acts_BXD.dim() != 3 or acts_BXD.shape[1:] != (X, D):
            raise CrossintError(
                f"crosscoder expects activations of shape (tokens, {X} positions, {D}), got "
                f"{tuple(acts_BXD.shape)}"
            )

    def normalise(self, acts_BXD: Tensor) -> Tensor:
        return acts_BXD * self.scale_X[:, None]

    def _pre_from_normalised(self, acts_norm_BXD: Tensor) -> Tensor:
        X, D, H = self.W_enc_XDH.shape
        if self.config.center_inputs:
            acts_norm_BXD = acts_norm_BXD - self.b_dec_XD
        # One (B, XD) × (XD, H) GEMM == einsum('bxd,xdh->bh').
        return acts_norm_BXD.reshape(-1, X * D) @ self.W_enc_XDH.reshape(X * D, H) + self.b_enc_H

    def pre_activations(self, acts_BXD: Tensor) -> Tensor:
        """pre_BH = einsum(a_BXD · s_X, W_enc_XDH) + b_enc_H."""
        self._check_acts(acts_BXD)
        return self._pre_from_normalised(self.normalise(acts_BXD))

    def _activate(self, pre_BH: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.activation.forward(pre_BH, self.threshold_H, self.training)

    def activate(self, pre_BH: Tensor) -> Tensor:
        """f_BH = act(pre_BH) (SPEC §3.2); BatchTopK is batch-wise only in training mode."""
        return self._activate(pre_BH)[0]

    def encode(self, acts_BXD: Tensor) -> Tensor:
        return self.activate(self.pre_activations(acts_BXD))

    @property
    def decodes_sparsely(self) -> bool:
        """Sparse gather for TopK-like activations, and for JumpReLU except while training with
        gradients (its threshold's straight-through gradient needs a dense decode)."""
        return self.activation.decodes_sparsely(self.training and torch.is_grad_enabled())

    def _decode_normalised(self, f_BH: Tensor) -> Tensor:
        return decode_features(f_BH, self.W_dec_HXD, self.decodes_sparsely) + self.b_dec_XD

    def decode(self, f_BH: Tensor) -> Tensor:
        """â_BXD = (einsum(f_BH, W_dec_HXD) + b_dec_XD) / s_X, in raw units."""
        return self._decode_normalised(f_BH) / self.scale_X[:, None]

    def forward(self, acts_BXD: Tensor) -> CrosscoderOutput:
        self._check_acts(acts_BXD)
        acts_norm_BXD = self.normalise(acts_BXD)
        pre_BH = self._pre_from_normalised(acts_norm_BXD)
        f_BH, batch_threshold = self._activate(pre_BH)
        recon_norm_BXD = self._decode_normalised(f_BH)
        return CrosscoderOutput(
            recon_BXD=recon_norm_BXD / self.scale_X[:, None],
            f_BH=f_BH,
            pre_BH=pre_BH,
            acts_norm_BXD=acts_norm_BXD,
            recon_norm_BXD=recon_norm_BXD,
            batch_threshold=batch_threshold,
        )

    # --- normalisation (SPEC §3.4) -------------------------------------------------------------
    @torch.no_grad()
    def estimate_normalisation(self, acts_TXD: Tensor) -> Tensor:
        """Set s_x = sqrt(D) / E‖a_x‖₂ from a sample of raw activations; returns scale_X."""
        if self.config.folded:
            raise CrossintError(
                "this crosscoder's normalisation is already folded into its weights; "
                "estimate the normalisation before folding"
            )
        self._check_acts(acts_TXD)
        if acts_TXD.shape[0] == 0:
            raise CrossintError("cannot estimate the normalisation from an empty sample")
        finite_TX = torch.isfinite(acts_TXD).all(dim=-1)
        if not bool(finite_TX.all()):
            raise CrossintError(
                f"the input activations hold non-finite values (NaN/Inf) in the normalisation "
                f"sample: {int((~finite_TX).any(dim=1).sum())} of its {acts_TXD.shape[0]} "
                f"tokens, first at token {int((~finite_TX).any(dim=1).nonzero()[0])}, at "
                f"{self._position_names(~finite_TX.all(dim=0))}; training needs finite "
                f"activations: clean the source"
            )
        mean_norm_X = acts_TXD.double().norm(dim=-1).mean(dim=0)
        bad = [
            f"{m}/{h}"
            for (m, h), norm in zip(self.positions, mean_norm_X.tolist(), strict=True)
            if not (math.isfinite(norm) and norm > 0)
        ]
        if bad:
            raise CrossintError(f"cannot normalise: activations at {bad} are all zero")
        scale_X = math.sqrt(self.config.d_model) / mean_norm_X
        self.scale_X.copy_(scale_X.to(self.scale_X.dtype))
        return self.scale_X

    def _position_names(self, mask_X: Tensor) -> str:
        """``model/hookpoint`` of the positions where ``mask_X`` is True."""
        return ", ".join(f"{m}/{h}" for (m, h), hit in zip(self.positions, mask_X.tolist(),
                                                            strict=True) if hit)

    @torch.no_grad()
    def fold_normalisation(self) -> Crosscoder:
        """SPEC §3.4: W_enc[x] ·= s_x, W_dec[:, x] /= s_x, b_dec[x] /= s_x, s = 1; the
        crosscoder then reads and writes raw activations. Input centering (training only) goes
        into b_enc first. Folding twice is a no-op."""
        scale_X = self.scale_X.clone()
        if self.config.center_inputs:
            # pre = (a·s − b_dec)·W_enc + b_enc: move −b_dec·W_enc into b_enc (normalised units).
            X, D, H = self.W_enc_XDH.shape
            self.b_enc_H.sub_(self.b_dec_XD.reshape(X * D) @ self.W_enc_XDH.reshape(X * D, H))
        self.W_enc_XDH.mul_(scale_X[:, None, None])
        self.W_dec_HXD.div_(scale_X[None, :, None])
        self.b_dec_XD.div_(scale_X[:, None])
        self.scale_X.fill_(1.0)
        self.config = self.config.replace(folded=True, center_inputs=False)
        return self

    # --- files ---------------------------------------------------------------------------------
    def inference_config(self) -> CrosscoderConfig:
        """The config a saved copy carries: BatchTopK becomes JumpReLU with θ (SPEC §3.2)."""
        return self.activation.saved_config()

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` atomically; ``extra`` adds top-level
        entries (training settings, data source) to ``config.json``."""
        from safetensors.torch import save_file

        run = RunDir(directory)
        run.path.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: tensor.detach().to("cpu", copy=True).contiguous()
            for name, tensor in self.state_dict().items()
        }
        # The format is named in config.json; safetensors metadata is a hash map written in
        # random order, so leaving it out keeps reruns byte-identical.
        digest: list[str] = []

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp))
            digest.append(sha256_file(tmp))

        atomic_write(run.weights, write)
        document = {"format": FORMAT, "version": FORMAT_VERSION}
        document.update(extra or {})
        document["crosscoder"] = self.inference_config().to_dict()
        document[WEIGHTS_SHA256] = digest[0]  # verified by every from_pretrained
        atomic_write_json(run.config, document)
        return run.path

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> Crosscoder:
        """Load a saved crosscoder (eval mode). Every problem with the files is a CrossintError
        naming the file and what was expected."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        run = RunDir(directory)
        if not run.path.is_dir():
            raise CrossintError(f"crosscoder directory not found: {run.path}")
        config_path = run.config
        document = read_json(config_path, "crosscoder config")
        if not isinstance(document, dict) or not isinstance(document.get("crosscoder"), dict):
            raise CrossintError(
                f"{config_path} is not a crosscoder config (it has no 'crosscoder' section)"
            )
        version = document.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CrossintError(
                f"{config_path} has format version {version!r}; this crossint reads versions "
                f"up to {FORMAT_VERSION}"
            )
        config = CrosscoderConfig.from_dict(document["crosscoder"], where=str(config_path))
        weights_path = run.weights
        if not weights_path.is_file():
            raise CrossintError(
                f"crosscoder weights not found: {weights_path} (has training finished?)"
            )
        _verify_weights(weights_path, document.get(WEIGHTS_SHA256), config_path)
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CrossintError(
                f"{weights_path} is corrupt or truncated ({str(e).splitlines()[0]})"
            ) from None
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CrossintError(
                f"{weights_path} does not match {config_path}: missing tensors {missing}, "
                f"unexpected tensors {unexpected}"
            )
        for name, tensor in tensors.items():
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise CrossintError(
                    f"tensor {name} in {weights_path} has shape {tuple(tensor.shape)}, but "
                    f"{config_path} implies {want}"
                )
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise CrossintError(f"tensor {name} in {weights_path} has NaN/Inf or bad dtype")
        with torch.no_grad():
            model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
        if device is not None:
            model.to(device)
        return model.eval()

    def extra_repr(self) -> str:
        cfg = self.config
        return (
            f"positions={cfg.n_positions} ({cfg.n_models} model(s) x {len(cfg.hookpoints)} "
            f"hookpoints), d_model={cfg.d_model}, n_features={cfg.n_features}, "
            f"activation={cfg.activation}, k={cfg.k}, folded={cfg.folded}"
        )


def _verify_weights(weights_path: Path, recorded: Any, config_path: Path) -> None:
    """CrossintError unless the weights have the sha256 config.json records (crosscoders saved
    before crossint recorded one load unchecked)."""
    if recorded is None:
        return
    if not isinstance(recorded, str) or sha256_file(weights_path) != recorded:
        raise CrossintError(
            f"{weights_path} does not match the sha256 recorded in {config_path} "
            f"({WEIGHTS_SHA256}): the file is corrupt or truncated, or was changed after "
            f"saving; restore it from a backup or train again"
        )
