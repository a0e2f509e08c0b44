"""The reference engine's model: a Llama / Qwen2 / Mistral-family decoder over a paged, block-major KV pool.

Place: ``workers.reference.batch`` builds one :class:`StepBatch` per scheduler step (every token of every
scheduled sequence, flattened) and calls :meth:`DecoderModel.forward`, which returns the logits of the rows
that sample. (An all-decode step may run on ``workers.reference.native`` instead, which reads this model's
weights; this module does not know it.) The model is plain tensors, not ``nn.Module``: the forward is
written for one packed batch (matmuls over all tokens at once) and reads / writes K and V through flat row
indices into the pool (``workers.reference.kv_cache``), so no per-sequence Python runs inside a layer except
for prefill chunks.

Numerics follow ``transformers``' Llama / Qwen2 code (RMSNorm in fp32, RoPE tables computed in fp32 with the
same inverse-frequency formulas for default / linear / dynamic / llama3 / yarn), so fp32 greedy output is
token-for-token what ``transformers`` produces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from dynamo_rt.errors import DynamoError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

# float64: the replayable mode. Float sums in another order (a prefill over many rows vs. one decode row, another
# batch) differ by ~1e-16 there, which the fp32 logits round away, so a migrated request's logits and logprobs
# are bit-identical to the first worker's (in float32 they differ by ~1e-5: tests/reliability/test_replay.py).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise DynamoError(f"unsupported dtype {name!r}; use one of float32, bfloat16, float16, float64") from None


@dataclass(slots=True)
class ModelConfig:
    """The fields of a Hugging Face ``config.json`` this engine reads."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta, factor, ...
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        mt = cfg.get("model_type", "")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise DynamoError(f"model_type {mt!r} is not supported by the reference engine "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise DynamoError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        if cfg.get("sliding_window") and (mt == "mistral" or cfg.get("use_sliding_window")):
            # Exact only while the context stays within the window; say so instead of silently diverging.
            log.warning("sliding_window=%s is not implemented: attention is full-context", cfg["sliding_window"])
        return cls(
            model_type=mt,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (and none on o_proj); Llama has them on all four if attention_bias.
            qkv_bias=mt == "qwen2" or attention_bias,
            o_bias=mt != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope=_rope_params(cfg),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_id_list(eos),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DynamoError(f"cannot read {path}: {e}") from e
        return cls.from_dict(cfg)


def _as_id_list(v: Any) -> list[int]:
    if v is None:
        return []
    if isinstance(v, int):
        return [v]
    return [int(x) for x in v]


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """One flat dict whatever the config's vintage: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (older checkpoints)."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rp.setdefault("rope_type", rp.get("type", "default"))
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        rp.setdefault("original_max_position_embeddings",
                      cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048)))
    return rp


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, length head_dim/2) and the cos/sin scale, as ``transformers`` computes them."""
    rp = cfg.rope
    rope_type = rp["rope_type"]
    base = float(rp["rope_theta"])
    dim = int(cfg.head_dim * float(rp.get("partial_rotary_factor", 1.0)))
    if dim != cfg.head_dim:
        raise DynamoError("partial_rotary_factor < 1 is not supported")

    def default() -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))

    if rope_type == "default":
        return default(), 1.0
    if rope_type == "linear":
        return default() / float(rp["factor"]), 1.0
    if rope_type == "dynamic":
        # NTK-dynamic only changes frequencies past max_position_embeddings, which is also our context limit.
        return default(), 1.0
    if rope_type == "llama3":
        inv = default()
        factor = float(rp["factor"])
        low_ff = float(rp["low_freq_factor"])
        high_ff = float(rp["high_freq_factor"])
        old_ctx = float(rp["original_max_position_embeddings"])
        low_wl = old_ctx / low_ff
        high_wl = old_ctx / high_ff
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, inv_l), 1.0
    if rope_type == "yarn":
        return _yarn(cfg, rp, base, dim)
    raise DynamoError(f"rope type {rope_type!r} is not supported (default, linear, dynamic, llama3, yarn)")


def _yarn(cfg: ModelConfig, rp: dict[str, Any], base: float, dim: int) -> tuple[torch.Tensor, float]:
    orig = int(rp["original_max_position_embeddings"])
    factor = rp.get("factor") or cfg.max_position_embeddings / orig
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rp.get("attention_factor")
    if attn is None:
        ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
        attn = mscale(factor, ms) / mscale(factor, msa) if ms and msa else mscale(factor)
    beta_fast = float(rp.get("beta_fast") or 32)
    beta_slow = float(rp.get("beta_slow") or 1)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, float(attn)


# --------------------------------------------------------------------------------------------- batch


@dataclass(slots=True)
class PrefillChunk:
    """One sequence computing more than one token this step (rows ``row:row+n`` of the packed batch)."""

    row: int
    n: int
    start: int  # position of the first token of the chunk (tokens before it are already in the pool)
    gather: tuple[torch.Tensor, ...] | None  # per layer: [start+n] token row of every position; None if start == 0


@dataclass(slots=True)
class StepBatch:
    """Everything one forward needs, already on the model's device, built once per step for all layers.

    Rows ``0:num_decode`` are sequences computing exactly one token (decode), the rest are prefill chunks.
    Token rows, viewing the pool ``[blocks, L, bs, 2, KV, D]`` as ``[-1, 2, KV, D]``: position p of a
    sequence in layer l is row ``block * L*bs + l*bs + p % bs``. Decode gathers use head rows (the pool as
    ``[-1, D]``): ``(token_row * 2 + kv_half) * KV + head``. Index tensors are per layer (tuples of views
    of one ``[L, ...]`` tensor), so a layer does no index arithmetic.
    """

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    write_idx: tuple[torch.Tensor, ...]  # per layer [N] int64: token row where each token's K and V go
    num_decode: int
    decode_gather: tuple[torch.Tensor, ...] | None  # per layer [2 * num_decode * KV * T] int64 head rows
    decode_bias: torch.Tensor | None  # [num_decode*KV, G, T]: 0 where attended, -inf on padding
    decode_len: int  # T: padded context length of the decode rows
    prefills: list[PrefillChunk]
    sample_rows: torch.Tensor | None  # [S] int64 rows whose logits are returned; None: every row


# --------------------------------------------------------------------------------------------- model

# enable_gqa arrived in torch 2.5; older versions get K/V repeated per query head.
_HAS_RMS_NORM = hasattr(F, "rms_norm")
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``q [1, H, n, D]``, ``k / v [1, KV, S, D]``; causal when ``mask`` is None. q is pre-scaled."""
    g = q.shape[1] // k.shape[1]
    if g > 1 and not _SDPA_GQA:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0)
    if g > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0,
                                              enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0)


# oneDNN's prepacked fp32 GEMM is about twice MKL's on small batches on this kind of CPU, but slower for a
# single row; below this many tokens a step uses the plain weights.
PACKED_MIN_TOKENS = 4
# Packing keeps a second copy of the weights: only for models up to this size.
PACKED_MAX_BYTES = 2 * 2**30


@dataclass(slots=True)
class _Lin:
    w: torch.Tensor
    b: torch.Tensor | None
    packed: torch.Tensor | None = None


@dataclass(slots=True)
class _Layer:
    ln1: torch.Tensor
    qkv: _Lin
    o: _Lin
    ln2: torch.Tensor
    gu: _Lin
    down: _Lin


def _interleave_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns each head's (first half, second half) RoPE pairs into adjacent (even, odd)
    pairs, so RoPE is one complex multiply. q and k get the same order, so q.k is unchanged; the KV pool
    holds K in this order (only our own engines read it)."""
    half = head_dim // 2
    per_head = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).reshape(-1)
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


class DecoderModel:
    """Weights + forward. Thread-confined to the engine's step thread once loaded."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.layers: list[_Layer] = []
        self.embed = torch.empty(0)
        self.norm = torch.empty(0)
        self.lm_head = _Lin(torch.empty(0), None)
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self._inv_freq = inv_freq
        self._cis = torch.empty(0)  # complex [len, D/2] (fp32 path)
        self._cos = torch.empty(0)  # [len, D/2] (other dtypes)
        self._sin = torch.empty(0)
        self._rope_len = 0
        self._complex_rope = dtype == torch.float32
        self.packed = False

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, model_dir: str | Path, cfg: ModelConfig, device: torch.device,
             dtype: torch.dtype) -> DecoderModel:
        m = cls(cfg, device, dtype)
        w = _read_safetensors(Path(model_dir))
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_rows = _interleave_rows(H, D)
        k_rows = _interleave_rows(KV, D)
        scale = D ** -0.5  # folded into q (RoPE is linear, so it commutes)

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            t = w.pop(name, None)
            if t is None:
                if required:
                    raise DynamoError(f"weight {name!r} is missing from {model_dir}")
                return None
            return t.to(dtype=torch.float32)

        def need(name: str) -> torch.Tensor:
            t = take(name)
            assert t is not None  # take(required=True) raised otherwise
            return t

        def dev(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()

        def devt(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        def lin(wt: torch.Tensor, bias: torch.Tensor | None) -> _Lin:
            return _Lin(devt(wt), dev(bias))

        m.embed = devt(need("model.embed_tokens.weight"))
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            wq = need(p + "self_attn.q_proj.weight")[q_rows] * scale
            wk = need(p + "self_attn.k_proj.weight")[k_rows]
            wv = need(p + "self_attn.v_proj.weight")
            bqkv = None
            if cfg.qkv_bias:
                bq = need(p + "self_attn.q_proj.bias")[q_rows] * scale
                bk = need(p + "self_attn.k_proj.bias")[k_rows]
                bqkv = torch.cat((bq, bk, need(p + "self_attn.v_proj.bias")))
            bgu = None
            if cfg.mlp_bias:
                bgu = torch.cat((need(p + "mlp.gate_proj.bias"), need(p + "mlp.up_proj.bias")))
            m.layers.append(_Layer(
                ln1=devt(need(p + "input_layernorm.weight")),
                qkv=lin(torch.cat((wq, wk, wv)), bqkv),
                o=lin(need(p + "self_attn.o_proj.weight"), take(p + "self_attn.o_proj.bias", cfg.o_bias)),
                ln2=devt(need(p + "post_attention_layernorm.weight")),
                gu=lin(torch.cat((need(p + "mlp.gate_proj.weight"), need(p + "mlp.up_proj.weight"))), bgu),
                down=lin(need(p + "mlp.down_proj.weight"), take(p + "mlp.down_proj.bias", cfg.mlp_bias)),
            ))
        m.norm = devt(need("model.norm.weight"))
        head = take("lm_head.weight", required=False)
        if head is None:
            if not cfg.tie_word_embeddings:
                log.warning("lm_head.weight missing: using the tied embedding matrix")
            m.lm_head = _Lin(m.embed, None)
        else:
            m.lm_head = lin(head, None)
        if w:
            log.debug("unused weights: %s", sorted(w)[:8])
        m._maybe_pack()
        m.ensure_rope(min(cfg.max_position_embeddings, 4096))
        return m

    def _linears(self) -> list[_Lin]:
        return [x for L in self.layers for x in (L.qkv, L.o, L.gu, L.down)] + [self.lm_head]

    def _maybe_pack(self) -> None:
        """Prepack fp32 CPU weights for oneDNN when that kernel exists and agrees with F.linear."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or _LINEAR_POINTWISE is None \
                or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            return
        lins = self._linears()
        if sum(x.w.numel() * x.w.element_size() for x in lins) > PACKED_MAX_BYTES:
            return
        try:
            probe = lins[0]
            packed = torch.ops.mkldnn._reorder_linear_weight(probe.w, 8)
            x = torch.randn(8, probe.w.shape[1])
            got = _LINEAR_POINTWISE(x, packed, probe.b, "none", [], "")
            if not torch.allclose(got, F.linear(x, probe.w, probe.b), rtol=1e-4, atol=1e-4):
                log.warning("oneDNN linear disagrees with F.linear: not using it")
                return
            for x_ in lins:
                x_.packed = torch.ops.mkldnn._reorder_linear_weight(x_.w, 8)
        except (RuntimeError, AttributeError) as e:
            log.info("oneDNN prepacked linear unavailable (%s): using F.linear", e)
            for x_ in lins:
                x_.packed = None
            return
        self.packed = True

    def ensure_rope(self, length: int) -> None:
        """Grow the RoPE tables to cover positions ``0..length-1``."""
        if length <= self._rope_len:
            return
        n = min(max(length, 2 * self._rope_len), max(self.cfg.max_position_embeddings, length))
        pos = torch.arange(n, dtype=torch.float32)
        freqs = pos[:, None] * self._inv_freq[None, :]  # fp32 as in transformers
        cos, sin = freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale
        if self._complex_rope:
            self._cis = torch.complex(cos, sin).to(self.device)
        else:
            self._cos = cos.to(device=self.device, dtype=self.dtype)
            self._sin = sin.to(device=self.device, dtype=self.dtype)
        self._rope_len = n

    @property
    def complex_rope(self) -> bool:
        return self._complex_rope

    def rope_table(self) -> torch.Tensor:
        """RoPE factors as fp32 ``[positions, D/2, 2]`` (cos, sin) pairs, scale included (complex path)."""
        return torch.view_as_real(self._cis)

    # ----------------------------------------------------------------------------------------- forward

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        if not _HAS_RMS_NORM:  # torch < 2.4
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        # transformers normalises in fp32 and casts back before the weight multiply.
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    def forward(self, b: StepBatch, pool: torch.Tensor) -> torch.Tensor:
        """Run one packed step; K/V of every input token are written to ``pool``. Returns fp32 logits
        ``[len(sample_rows), vocab]``.

        Written for a small model, where per-op overhead rather than arithmetic bounds a decode step: one
        fused q/k/v and one gate/up matmul per layer, indices precomputed per layer by the batch builder, views
        taken with ``narrow`` / ``unbind``, the linear kernel chosen once per step."""
        cfg = self.cfg
        n_tok = b.input_ids.shape[0]
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        G = H // KV
        tok_rows = pool.view(-1, 2, KV, D)
        heads = pool.view(-1, D)
        lin = _linear_packed if self.packed and n_tok >= PACKED_MIN_TOKENS else _linear
        rms = self._rms
        if _HAS_RMS_NORM and self.dtype == torch.float32:
            hshape, eps = (cfg.hidden_size,), cfg.rms_norm_eps

            def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # F.rms_norm minus its Python wrapper
                return torch.rms_norm(x, hshape, w, eps)
        nd = b.num_decode
        T = b.decode_len
        complex_rope = self._complex_rope
        if complex_rope:
            cis = self._cis[b.positions].unsqueeze(1)  # [N, 1, D/2] complex
        else:
            cos = self._cos[b.positions].unsqueeze(1)
            sin = self._sin[b.positions].unsqueeze(1)
        groups = _prefill_groups(b.prefills) if b.prefills else ()
        x = F.embedding(b.input_ids, self.embed)
        for li, L in enumerate(self.layers):
            qkv = lin(rms(x, L.ln1), L.qkv)  # [N, (H + 2KV) * D]: q, k, v
            qk = qkv.narrow(1, 0, (H + KV) * D).view(n_tok, H + KV, D // 2, 2)
            if complex_rope:
                torch.view_as_complex(qk).mul_(cis)  # RoPE in place: q and k stay inside qkv
            else:
                xe, xo = qk.unbind(-1)
                qk.copy_(torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1))
            q = qkv.narrow(1, 0, H * D)
            kv = qkv.narrow(1, H * D, 2 * KV * D).view(n_tok, 2, KV, D)
            tok_rows.index_copy_(0, b.write_idx[li], kv)

            if nd and not groups:
                assert b.decode_gather is not None and b.decode_bias is not None
                kd, vd = heads.index_select(0, b.decode_gather[li]).view(2, nd * KV, T, D).unbind(0)
                s = torch.baddbmm(b.decode_bias, q.reshape(nd * KV, G, D), kd.transpose(1, 2))
                attn = torch.bmm(torch.softmax(s, dim=-1), vd).view(nd, H * D)
            else:
                attn = self._attend_mixed(b, li, q, kv, heads, tok_rows, groups)
            x = lin(attn, L.o).add_(x)
            gate, up = lin(rms(x, L.ln2), L.gu).chunk(2, dim=-1)
            x = lin(F.silu(gate).mul_(up), L.down).add_(x)
        if b.sample_rows is not None:
            x = x.index_select(0, b.sample_rows)
        x = rms(x, self.norm)
        head = _linear_packed if self.packed and x.shape[0] >= PACKED_MIN_TOKENS else _linear
        return head(x, self.lm_head).float()

    def _attend_mixed(self, b: StepBatch, li: int, q: torch.Tensor, kv: torch.Tensor, heads: torch.Tensor,
                      tok_rows: torch.Tensor, groups: Iterable[_Group]) -> torch.Tensor:
        """Attention of one layer for a step with prefill chunks (and maybe decode rows)."""
        cfg = self.cfg
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        G = H // KV
        nd = b.num_decode
        outs: list[torch.Tensor] = []
        if nd:
            assert b.decode_gather is not None and b.decode_bias is not None
            T = b.decode_len
            kd, vd = heads.index_select(0, b.decode_gather[li]).view(2, nd * KV, T, D).unbind(0)
            s = torch.baddbmm(b.decode_bias, q[:nd].reshape(nd * KV, G, D), kd.transpose(1, 2))
            outs.append(torch.bmm(torch.softmax(s, dim=-1), vd).view(nd, H * D))
        for row, cnt, n, c, mask in groups:
            if c is None:
                # cnt fresh sequences of n tokens each, in consecutive rows: one causal call.
                qg = q[row: row + cnt * n].view(cnt, n, H, D).transpose(1, 2)  # [cnt, H, n, D]
                kvg = kv[row: row + cnt * n].view(cnt, n, 2, KV, D)
                o = _sdpa(qg, kvg[:, :, 0].transpose(1, 2), kvg[:, :, 1].transpose(1, 2), None)
                outs.append(o.transpose(1, 2).reshape(cnt * n, H * D))
            else:
                # A later chunk: attend to everything before it through the pool.
                assert c.gather is not None
                kvc = tok_rows.index_select(0, c.gather[li])  # [S, 2, KV, D]
                qc = q[row: row + n].view(n, H, D).transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
                kc = kvc[:, 0].transpose(0, 1).unsqueeze(0)  # [1, KV, S, D]
                vc = kvc[:, 1].transpose(0, 1).unsqueeze(0)
                o = _sdpa(qc, kc, vc, mask)
                outs.append(o[0].transpose(0, 1).reshape(n, H * D))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


# The op itself (not its Python OpOverloadPacket): called ~20 times a step, the wrapper's cost shows.
_LINEAR_POINTWISE: Any = None
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    with contextlib.suppress(AttributeError, RuntimeError):
        _op = torch.ops.mkldnn._linear_pointwise.default
        _LINEAR_POINTWISE = getattr(_op, "_op", _op)  # the bound C++ op under OpOverload.__call__


def _linear(x: torch.Tensor, lin: _Lin) -> torch.Tensor:
    return F.linear(x, lin.w, lin.b)


def _linear_packed(x: torch.Tensor, lin: _Lin) -> torch.Tensor:
    if lin.packed is None:
        return F.linear(x, lin.w, lin.b)
    return _LINEAR_POINTWISE(x, lin.packed, lin.b, "none", [], "")  # type: ignore[no-any-return]


_Group = tuple[int, int, int, PrefillChunk | None, torch.Tensor | None]


def _prefill_groups(chunks: list[PrefillChunk]) -> list[_Group]:
    """``(row, count, n, chunk, mask)`` per attention call: consecutive first chunks (start 0) of equal
    length are batched (``chunk`` None); a later chunk gets its causal mask over the pool positions."""
    out: list[_Group] = []
    for c in chunks:
        if c.gather is None:
            last = out[-1] if out else None
            if last is not None and last[3] is None and last[2] == c.n and last[0] + last[1] * last[2] == c.row:
                out[-1] = (last[0], last[1] + 1, c.n, None, None)
            else:
                out.append((c.row, 1, c.n, None, None))
        else:
            dev = c.gather[0].device
            qpos = torch.arange(c.start, c.start + c.n, device=dev)
            mask = torch.arange(c.gather[0].shape[0], device=dev)[None, :] <= qpos[:, None]
            out.append((c.row, 1, c.n, c, mask))
    return out


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise DynamoError(f"no *.safetensors weights in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out
