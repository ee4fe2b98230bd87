"""SmolLM3 in MLX: Llama with grouped-query attention, tied embeddings and NoPE every 4th layer."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache, KVCache, check_kv_quantization
from .rope import make_rope
from .sample import Sampling

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# transformers' SmolLM3Config.default_theta, used when a config names no theta (not Llama's 10000).
DEFAULT_ROPE_THETA = 2_000_000.0


@dataclass
class ModelArgs:
    model_type: str = "smollm3"
    hidden_size: int = 2048
    num_hidden_layers: int = 36
    intermediate_size: int = 11008
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    vocab_size: int = 128256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 65536
    # transformers 4 spelling ...
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    # ... and transformers 5 spelling; __post_init__ folds both into rope_theta + rope_scaling.
    rope_parameters: dict[str, Any] | None = None
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    use_sliding_window: bool = False
    quantization: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in known})

    def __post_init__(self):
        if self.model_type != "smollm3":
            raise ValueError(f"model_type is {self.model_type!r}, expected 'smollm3'")
        if self.use_sliding_window:
            raise ValueError("use_sliding_window is true; SmolLM3 checkpoints use full attention")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # 1 = the layer uses RoPE, 0 = NoPE (transformers: use_rope = no_rope_layers[i]).
        if self.no_rope_layers is None:
            interval = self.no_rope_layer_interval
            self.no_rope_layers = [
                int((i + 1) % interval != 0) for i in range(self.num_hidden_layers)
            ]
        elif len(self.no_rope_layers) != self.num_hidden_layers:
            raise ValueError(
                f"no_rope_layers has {len(self.no_rope_layers)} entries, "
                f"expected num_hidden_layers = {self.num_hidden_layers}"
            )
        self._normalise_rope()

    def _normalise_rope(self):
        # As transformers reads them: rope_scaling wins over rope_parameters, a theta inside the
        # dict over the top-level rope_theta, and SmolLM3's own default comes last.
        params = dict(self.rope_scaling or self.rope_parameters or {})
        theta = params.pop("rope_theta", None)
        if theta is None:
            theta = self.rope_theta if self.rope_theta is not None else DEFAULT_ROPE_THETA
        self.rope_theta = float(theta)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"unsupported RoPE type {rope_type!r} (SmolLM3 uses default or yarn)")
        if rope_type == "default":
            self.rope_scaling = None
        else:
            if rope_type == "yarn" and "original_max_position_embeddings" not in params:
                raise ValueError(
                    "YaRN rope scaling needs original_max_position_embeddings "
                    "(SmolLM3-3B: 65536); refusing to guess"
                )
            if rope_type == "yarn" and params.get("factor") is None:
                raise ValueError("YaRN rope scaling needs a factor")
            self.rope_scaling = {"rope_type": rope_type, **params}
        self.rope_parameters = {"rope_theta": self.rope_theta, "rope_type": rope_type, **params}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, use_rope: bool):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.use_rope = use_rope
        if use_rope:
            self.rope = make_rope(head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, x: mx.array, mask=None, cache: Cache | None = None) -> mx.array:
        B, L, D = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(
            0, 2, 1, 3
        )  # (B, n_heads, L, hd)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, n_kv, L, hd)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        if self.use_rope:
            offset = cache.offset if cache is not None else 0
            queries = self.rope(queries, offset=offset)
            keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
            output = cache.attend(queries, keys, values, scale=self.scale, mask=mask)
        else:
            output = mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=self.scale, mask=mask
            )
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, n_heads * hd)
        return self.o_proj(output)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, use_rope=bool(args.no_rope_layers[layer_idx]))
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache: Cache | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class SmolLM3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[Cache] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        L = h.shape[1]
        if cache is None:
            cache, masks = (
                [None] * len(self.layers),
                ["causal" if L > 1 else None] * len(self.layers),
            )
        else:
            masks = [c.prepare(L) for c in cache]  # makes room first: rotation happens here
        for layer, c, mask in zip(self.layers, cache, masks, strict=True):
            h = layer(h, mask, c)
        return self.norm(h)


@dataclass(frozen=True)
class ModelInfo:
    """What `load` learnt about a model beside its weights (`model.info`).

    Args:
        path: the model folder.
        max_context: the longest context allowed (the trained window, or what YaRN reaches).
        sampling: the sampling defaults of the folder's generation_config.json.
        tokenizer: the folder's tokenizer (None from `load_model`, which reads no tokenizer).
    """

    path: Path | None = None
    max_context: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    tokenizer: Tokenizer | None = None


class Model(nn.Module):
    info: ModelInfo | None = None  # path, context window, sampling defaults: set by `load`

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = SmolLM3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[Cache] | None = None) -> mx.array:
        out = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    @property
    def max_context(self) -> int | None:
        """The longest context allowed, as loaded (None for a model not made by `load`)."""
        return self.info.max_context if self.info is not None else None

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    def make_cache(
        self,
        max_size: int | None = None,
        keep: int = 0,
        *,
        bits: int | None = None,
        group_size: int = 64,
        quantize_after: int = 0,
        chunk: int | None = None,
    ) -> list[Cache]:
        """One cache per layer; see `KVCache` for rotation (max_size, keep) and quantization."""
        check_kv_quantization(self.args.head_dim, bits, group_size)
        return [
            KVCache(
                max_size,
                keep,
                rotate=layer.self_attn.rope.shift if layer.self_attn.use_rope else None,
                chunk=chunk,
                bits=bits,
                group_size=group_size,
                quantize_after=quantize_after,
            )
            for layer in self.layers
        ]
