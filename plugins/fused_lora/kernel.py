"""Fused LoRA linear layer in Triton: ``y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ (+ bias)``, and DoRA
without dropout: ``y = g ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) (+ bias)``, g = m / ‖W + s·BA‖ per output row.

Five kernels, two GEMMs carrying the rank-r work inside their accumulators::

    forward   S  = dropout(X) Aᵀ            _lora_down   (mask from Philox, never stored)
              Y  = X Wᵀ + s·S Bᵀ + bias     _lora_fwd    (S Bᵀ joins the base accumulator)
    backward  dS = s·G B,  dB = s·Gᵀ S      _lora_grad_sb (G read once for both, + dbias)
              dA = dSᵀ dropout(X)           _lora_grad_a (mask regenerated from the seed)
              dX = G W + (dS A) ⊙ D         _lora_grad_x (LoRA part masked in the epilogue)

DoRA adds a column scale g: _lora_fwd multiplies its accumulator by g before the bias, and
_lora_grad_sb and _lora_grad_x scale G's tiles by g as they load them; _lora_grad_sb also sums
G ⊙ (Y − bias) for the magnitude's gradient. The row norms (``dora_row_norm``) take W Aᵀ from
_lora_down and the rest from small fp32 torch ops.

QLoRA: W may be a frozen 4-bit NF4 weight in bitsandbytes' layout (``Nf4Weight``). _lora_fwd and
_lora_grad_x then load its packed bytes and per-block scales instead of a W tile and dequantise
it in registers (``_load_nf4``); the dense W is never formed.

On CUDA the kernels are compiled and autotuned. With ``TRITON_INTERPRET=1`` set before this
module is imported they run on CPU tensors through Triton's interpreter, with one small fixed
block configuration and every ``tl.dot`` operand upcast to fp32 (the interpreter's bf16 dot is
wrong, triton#11584). The mode is fixed when this module is imported, as ``triton.jit`` fixes it.
"""

import functools
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
MAX_RANK = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Under the interpreter: small blocks so CPU tests are quick, yet several blocks per dimension
# (ragged edges, grouped ordering and split reductions all get exercised).
_INTERPRETER_META = {"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_T": 2}
_INTERPRETER_PROGRAMS = 4


def _config(block_t, block_n, block_k, group_t, warps, stages):
    meta = {"BLOCK_T": block_t, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_T": group_t}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Matmul tiles after Triton's matmul tutorial. In _lora_fwd the output tile is T x N and K is
# reduced; in _lora_grad_x the output tile is T x K and N is reduced.
_GEMM_CONFIGS = [
    _config(128, 256, 64, 8, warps=8, stages=3),
    _config(256, 128, 64, 8, warps=8, stages=3),
    _config(128, 128, 64, 8, warps=8, stages=4),
    _config(128, 128, 32, 8, warps=4, stages=4),
    _config(64, 128, 64, 8, warps=4, stages=4),
    _config(64, 64, 32, 8, warps=4, stages=3),
]
# The skinny kernels are memory-bound passes over X or G against a [*, r] operand; small
# BLOCK_T keeps enough programs for short T.
_SKINNY_CONFIGS = [
    _config(16, 64, 128, 1, warps=4, stages=3),
    _config(32, 64, 128, 1, warps=4, stages=3),
    _config(64, 64, 64, 1, warps=4, stages=3),
    _config(64, 128, 64, 1, warps=4, stages=3),
    _config(128, 64, 64, 1, warps=8, stages=3),
]


def _prune(configs, named_args, **kwargs):
    return [triton.Config(_INTERPRETER_META)] if INTERPRETED else configs


def _autotune(configs, key, reset_to_zero=None):
    """Autotune on GPU, keyed on the shape (T bucketed to a power of two, so that ragged batches
    share one tuning); under the interpreter, always the one small configuration."""
    return triton.autotune(configs, key=key, reset_to_zero=reset_to_zero, prune_configs_by={"early_config_prune": _prune})


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(rows, cols, stride_row, stride_col, num_rows, num_cols):
    """Offsets and in-bounds mask of the tile ``[rows, cols]`` of a ``num_rows x num_cols`` matrix."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    return offsets, (rows < num_rows)[:, None] & (cols < num_cols)[None, :]


@triton.jit
def _load(base, rows, cols, stride_row, stride_col, num_rows, num_cols):
    """The tile ``base[rows, cols]``, zero outside the matrix (so padded rows and ranks add 0)."""
    offsets, mask = _tile_offsets(rows, cols, stride_row, stride_col, num_rows, num_cols)
    return tl.load(base + offsets, mask=mask, other=0.0)


@triton.jit
def _load_nf4(packed, absmax, code, outs, k0, n, k, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """The tile ``W[outs, k0 : k0 + BLOCK_K]`` of an NF4 weight, dequantised to fp32.

    bitsandbytes' layout: W[j, c] has the flat index f = j·k + c; its 4-bit code is in byte
    f // 2 (the high nibble for even f) and its value is ``code[nibble] · absmax[f //
    BLOCKSIZE]``, the fp32 product ``dequantize_4bit`` forms. Gathering a scale and a level per
    weight would make the pipeline stage each as a [BLOCK_N, BLOCK_K] fp32 tile in shared
    memory; instead each row loads the SPAN scales its BLOCK_K weights can fall in, and the 16
    levels are scalars picked by a select chain.

    Outside W the values are finite but not zero, unlike ``_load``'s: in both GEMMs the other
    operand is zero there (X's or G's masked columns), or the product falls outside the stored
    tile, so zeroing them would cost a select per weight for nothing.
    """
    SPAN: tl.constexpr = (BLOCK_K - 1) // BLOCKSIZE + 2
    in_row = tl.arange(0, BLOCK_K)
    row_start = outs.to(tl.int64) * k + k0  # flat index of W[j, k0]
    first_block = row_start // BLOCKSIZE
    # Per weight, int32: its position from the start of its row's first block (f - first_block ·
    # BLOCKSIZE); the blocksize is even, so that position's parity is f's.
    row_offset = (row_start % BLOCKSIZE).to(tl.int32)
    within = row_offset[:, None] + in_row[None, :]
    mask = (outs < n)[:, None] & (k0 + in_row < k)[None, :]
    byte = tl.load(packed + (first_block * (BLOCKSIZE // 2))[:, None] + within // 2, mask=mask, other=0)
    nibble = tl.where(within % 2 == 0, byte >> 4, byte & 0xF).to(tl.int32)
    row_end = row_offset + tl.minimum(k - k0, BLOCK_K)  # past the row's last weight in W
    scale = tl.zeros((outs.shape[0], BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(SPAN):
        # Only the blocks that the row's weights in W fall in: those exist.
        row_scale = tl.load(absmax + first_block + i, mask=(outs < n) & (i * BLOCKSIZE < row_end), other=0.0)
        scale = tl.where(within // BLOCKSIZE == i, row_scale[:, None], scale)
    level = tl.zeros(nibble.shape, dtype=tl.float32) + tl.load(code)
    for i in tl.static_range(1, 16):
        level = tl.where(nibble == i, tl.load(code + i), level)
    return level * scale


@triton.jit
def _store(base, rows, cols, num_rows, num_cols, value):
    """Store ``value`` into the tile ``base[rows, cols]`` of a row-major matrix."""
    offsets, mask = _tile_offsets(rows, cols, num_cols, 1, num_rows, num_cols)
    tl.store(base + offsets, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate(base, rows, cols, num_rows, num_cols, value):
    """Atomically add ``value`` into the tile ``base[rows, cols]`` of a row-major fp32 matrix."""
    offsets, mask = _tile_offsets(rows, cols, num_cols, 1, num_rows, num_cols)
    tl.atomic_add(base + offsets, value, mask=mask, sem="relaxed")


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scale_columns(g, column_scale, cols, num_cols):
    """``g ⊙ column_scale[cols]`` (broadcast over rows), back in g's dtype for the next dot."""
    scale = tl.load(column_scale + cols, mask=cols < num_cols, other=0.0)
    return (g.to(tl.float32) * scale[None, :]).to(g.dtype)


@triton.jit
def _dropout_scale(seed, rows, cols, k, p, keep_scale):
    """Dropout multiplier of X[rows, cols]: ``keep_scale`` where kept, 0 where dropped.

    Philox on the flat index ``row * k + col`` of X, so every kernel regenerates the same mask.
    """
    offsets = rows.to(tl.int64)[:, None] * k + cols[None, :]
    return tl.where(tl.rand(seed, offsets) >= p, keep_scale, 0.0)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, GROUP_M row blocks at a time, for L2 reuse."""
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * blocks_n) * GROUP_M
    group_size = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    in_group = pid % (GROUP_M * blocks_n)
    return first_m + in_group % group_size, in_group // group_size


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@_autotune(_SKINNY_CONFIGS, key=["T_BUCKET", "k", "r"])
@triton.jit(do_not_specialize=["seed"])
def _lora_down(
    X,
    A,
    S,
    T,
    k,
    r,
    T_BUCKET,
    stride_xt,
    stride_xk,
    stride_ar,
    stride_ak,
    seed,
    p,
    keep_scale,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """S[T, r] = dropout(X) Aᵀ; one program per BLOCK_T rows, looping over k."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load(X, rows, cols, stride_xt, stride_xk, T, k)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * _dropout_scale(seed, rows, cols, k, p, keep_scale)).to(x.dtype)
        a_t = _load(A, cols, ranks, stride_ak, stride_ar, k, r)
        acc = _mma(x, a_t, acc, UPCAST, PRECISION)
    _store(S, rows, ranks, T, r, acc)


@_autotune(_GEMM_CONFIGS, key=["T_BUCKET", "n", "k", "r"])
@triton.jit
def _lora_fwd(
    X,
    W,
    W_packed,
    W_absmax,
    W_code,
    S,
    B,
    bias,
    column_scale,
    Y,
    T,
    n,
    k,
    r,
    T_BUCKET,
    stride_xt,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_bn,
    stride_br,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_NF4_WEIGHT: tl.constexpr,
    NF4_BLOCKSIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """Y[T, n] = (X Wᵀ + s·S Bᵀ) ⊙ g (+ bias): the rank-r product is one more step of the K
    loop; DoRA's column scale g (fp32 ``[n]``) multiplies the accumulator in the epilogue.

    With HAS_NF4_WEIGHT, W is read as W_packed / W_absmax / W_code (``Nf4Weight``) and each tile
    is dequantised in registers to X's dtype before its dot."""
    pid_t, pid_n = _grouped_tile(T, n, BLOCK_T, BLOCK_N, GROUP_T)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = _load(X, rows, cols, stride_xt, stride_xk, T, k)
        if HAS_NF4_WEIGHT:
            w = _load_nf4(W_packed, W_absmax, W_code, outs, k0, n, k, BLOCK_K, NF4_BLOCKSIZE)
            w_t = tl.trans(w.to(X.dtype.element_ty))
        else:
            w_t = _load(W, cols, outs, stride_wk, stride_wn, k, n)
        acc = _mma(x, w_t, acc, UPCAST, PRECISION)
    s = _load(S, rows, ranks, r, 1, T, r)
    s = (s.to(tl.float32) * scale).to(S.dtype.element_ty)
    b_t = _load(B, ranks, outs, stride_br, stride_bn, r, n)
    acc = _mma(s, b_t, acc, UPCAST, PRECISION)
    if HAS_COLUMN_SCALE:
        acc *= tl.load(column_scale + outs, mask=outs < n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + outs, mask=outs < n, other=0.0).to(tl.float32)[None, :]
    _store(Y, rows, outs, T, n, acc)


@_autotune(_SKINNY_CONFIGS, key=["T_BUCKET", "n", "r"], reset_to_zero=["dS", "dB", "dbias", "GY"])
@triton.jit
def _lora_grad_sb(
    G,
    B,
    S,
    column_scale,
    Y,
    bias,
    dS,
    dB,
    dbias,
    GY,
    T,
    n,
    r,
    T_BUCKET,
    stride_gt,
    stride_gn,
    stride_bn,
    stride_br,
    scale,
    HAS_DBIAS: tl.constexpr,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_GY: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """dS[T, r] = s·G' B and dB[n, r] = s·G'ᵀ S, G' = G ⊙ g, from one read of G; from the same
    tiles dbias = Σ_t G and, for DoRA's magnitude, GY[n] = Σ_t G ⊙ (Y − bias).

    Without a column scale G' = G. Program (i, j) takes row block i of G and every
    num_programs(1)-th column block from j. dS sums over n and dB over T, so one of them always
    crosses programs: both are fp32 atomic adds into zeroed buffers (dS only when the columns
    are split). A deterministic split would need a [T / BLOCK_T, n, r] partial buffer, as large
    as G itself at r = 64.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.arange(0, BLOCK_R)
    s = _load(S, rows, ranks, r, 1, T, r)
    ds = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, n, tl.num_programs(1) * BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        in_bounds = outs < n
        g = _load(G, rows, outs, stride_gt, stride_gn, T, n)
        # dbias and GY take G itself, the rank-r products G ⊙ g.
        if HAS_DBIAS:
            tl.atomic_add(dbias + outs, tl.sum(g.to(tl.float32), axis=0), mask=in_bounds, sem="relaxed")
        if HAS_GY:
            y = _load(Y, rows, outs, n, 1, T, n).to(tl.float32)
            if HAS_BIAS:
                y -= tl.load(bias + outs, mask=in_bounds, other=0.0).to(tl.float32)[None, :]
            tl.atomic_add(GY + outs, tl.sum(g.to(tl.float32) * y, axis=0), mask=in_bounds, sem="relaxed")
        if HAS_COLUMN_SCALE:
            g = _scale_columns(g, column_scale, outs, n)
        b = _load(B, outs, ranks, stride_bn, stride_br, n, r)
        ds = _mma(g, b, ds, UPCAST, PRECISION)
        db = _mma(tl.trans(g), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), UPCAST, PRECISION)
        _accumulate(dB, outs, ranks, n, r, db * scale)
    if tl.num_programs(1) == 1:
        _store(dS, rows, ranks, T, r, ds * scale)
    else:
        _accumulate(dS, rows, ranks, T, r, ds * scale)


@_autotune(_SKINNY_CONFIGS, key=["T_BUCKET", "k", "r"], reset_to_zero=["dA"])
@triton.jit(do_not_specialize=["seed"])
def _lora_grad_a(
    dS,
    X,
    dA,
    T,
    k,
    r,
    T_BUCKET,
    stride_xt,
    stride_xk,
    seed,
    p,
    keep_scale,
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """dA[r, k] = dSᵀ dropout(X), the mask regenerated from the seed.

    Program (i, j) owns column block i of X and every num_programs(1)-th row block from j; the
    T reduction is split over programs (atomic adds) so that few column blocks still fill the
    device.
    """
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for t0 in range(tl.program_id(1) * BLOCK_T, T, tl.num_programs(1) * BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        x = _load(X, rows, cols, stride_xt, stride_xk, T, k)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * _dropout_scale(seed, rows, cols, k, p, keep_scale)).to(x.dtype)
        ds_t = _load(dS, ranks, rows, 1, r, r, T)
        acc = _mma(ds_t.to(x.dtype), x, acc, UPCAST, PRECISION)
    _accumulate(dA, ranks, cols, r, k, acc)


@_autotune(_GEMM_CONFIGS, key=["T_BUCKET", "n", "k", "r"])
@triton.jit(do_not_specialize=["seed"])
def _lora_grad_x(
    G,
    W,
    W_packed,
    W_absmax,
    W_code,
    dS,
    A,
    column_scale,
    dX,
    T,
    n,
    k,
    r,
    T_BUCKET,
    stride_gt,
    stride_gn,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    seed,
    p,
    keep_scale,
    HAS_DROPOUT: tl.constexpr,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_NF4_WEIGHT: tl.constexpr,
    NF4_BLOCKSIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    """dX[T, k] = G' W + (dS A) ⊙ D, G' = G ⊙ g (each G tile scaled as it is loaded; G' = G
    without a column scale).

    Without dropout dS A joins the base accumulator. With dropout the mask multiplies only the
    LoRA part, so it gets its own accumulator tile, masked and added in the epilogue. An NF4 W
    is dequantised tile by tile as in _lora_fwd.
    """
    pid_t, pid_k = _grouped_tile(T, k, BLOCK_T, BLOCK_K, GROUP_T)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        g = _load(G, rows, outs, stride_gt, stride_gn, T, n)
        if HAS_COLUMN_SCALE:
            g = _scale_columns(g, column_scale, outs, n)
        if HAS_NF4_WEIGHT:
            w = _load_nf4(W_packed, W_absmax, W_code, outs, pid_k * BLOCK_K, n, k, BLOCK_K, NF4_BLOCKSIZE)
            w = w.to(G.dtype.element_ty)
        else:
            w = _load(W, outs, cols, stride_wn, stride_wk, n, k)
        acc = _mma(g, w, acc, UPCAST, PRECISION)
    ds = _load(dS, rows, ranks, r, 1, T, r).to(dX.dtype.element_ty)
    a = _load(A, ranks, cols, stride_ar, stride_ak, r, k)
    if HAS_DROPOUT:
        lora = _mma(ds, a, tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32), UPCAST, PRECISION)
        acc += lora * _dropout_scale(seed, rows, cols, k, p, keep_scale)
    else:
        acc = _mma(ds, a, acc, UPCAST, PRECISION)
    _store(dX, rows, cols, T, k, acc)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(M, T, k, seed, p, keep_scale, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    _store(M, rows, cols, T, k, _dropout_scale(seed, rows, cols, k, p, keep_scale))


@triton.jit
def _nf4_dequantize_kernel(
    W_packed,
    W_absmax,
    W_code,
    out,
    n,
    k,
    NF4_BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _load_nf4(W_packed, W_absmax, W_code, outs, k0, n, k, BLOCK_K, NF4_BLOCKSIZE)
    _store(out, outs, k0 + tl.arange(0, BLOCK_K), n, k, w)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _keep_scale(p):
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def dropout_mask(shape, p, seed, device="cpu"):
    """The dropout multiplier D (0 or 1/(1-p)) the kernels apply to X of ``shape`` ``(T, k)``.

    For tests and references: ``fused_lora_linear`` uses exactly ``x.reshape(T, k) * D``.
    """
    T, k = shape
    mask = torch.empty(T, k, device=device, dtype=torch.float32)
    grid = (triton.cdiv(T, 32), triton.cdiv(k, 32))
    _dropout_mask_kernel[grid](mask, T, k, seed, float(p), _keep_scale(p), BLOCK_T=32, BLOCK_K=32)
    return mask


class Nf4Weight(NamedTuple):
    """A frozen ``[n, k]`` weight quantised to 4-bit NF4 in bitsandbytes' layout (``nf4_weight``
    builds one from a ``Linear4bit``): W[j, c] has the flat index f = j·k + c, its 4-bit code
    is in byte f // 2 of ``packed`` (the high nibble for even f), and its value is
    ``code[nibble] · absmax[f // blocksize]`` in fp32, rounded to the activation dtype.
    """

    packed: torch.Tensor  # uint8, ⌈n·k / 2⌉ bytes
    absmax: torch.Tensor  # fp32 scale of each block of ``blocksize`` consecutive weights
    code: torch.Tensor  # fp32 [16]: the NF4 levels
    blocksize: int
    shape: tuple  # (n, k)

    @property
    def device(self):
        return self.packed.device


# id(Linear4bit weight) -> (the tensors its fp32 block scales came from, their versions, the
# scales); an entry goes when its weight is collected.
_block_scales_cache = {}


def nf4_weight(weight):
    """The ``Nf4Weight`` of a bitsandbytes NF4 weight (``Linear4bit.weight``, a ``Params4bit``)."""
    state = weight.quant_state
    if state.quant_type != "nf4" or len(state.shape) != 2:
        raise ValueError(f"nf4_weight: expected a 2-D NF4 weight, got {state.quant_type} of shape {tuple(state.shape)}")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "nf4_weight: the weight is in bitsandbytes' AVX512-BF16 CPU inference packing, not the NF4 layout; "
            "set support_avx512bf16_for_cpu = False on the Linear4bit layer (the qlora plugin does)"
        )
    packed = weight.data.view(torch.uint8).reshape(-1)
    return Nf4Weight(packed, _block_scales(weight, state), state.code, state.blocksize, tuple(state.shape))


def _block_scales(weight, state):
    """The fp32 scale of each block of ``weight``.

    With double quantisation the scales are stored as 8-bit codes with scales of their own and
    an offset; they are dequantised as ``dequantize_4bit`` does, once per weight (n·k/blocksize
    floats). The cache is keyed on the weight's id, dropped with the weight (tensors cannot key a
    WeakKeyDictionary: its lookups compare them with ==, and a ``QuantState`` is unhashable), and
    each entry is checked against the very tensors it came from, which it holds so that their
    ids cannot be reused, and their versions: ``QuantState.to`` swaps those tensors in place.
    """
    if not state.nested:
        return state.absmax
    sources = (state.absmax, state.offset, state.state2.absmax, state.state2.code)
    versions = tuple(source._version for source in sources)
    key = id(weight)
    cached = _block_scales_cache.get(key)
    if cached is not None and all(a is b for a, b in zip(cached[0], sources)) and cached[1] == versions:
        return cached[2]
    import bitsandbytes.functional as bnb_functional

    with torch.no_grad():
        scales = (bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    if cached is None:
        weakref.finalize(weight, _block_scales_cache.pop, key, None)
    _block_scales_cache[key] = (sources, versions, scales)
    return scales


def dequantize_nf4(weight, dtype=torch.float32):
    """The dense ``[n, k]`` matrix of an ``Nf4Weight``, through the loader the GEMMs use.

    For tests and references: the fused kernels never form it.
    """
    n, k = weight.shape
    out = torch.empty(n, k, device=weight.device, dtype=dtype)
    grid = (triton.cdiv(n, 32), triton.cdiv(k, 64))
    _nf4_dequantize_kernel[grid](
        weight.packed, weight.absmax, weight.code, out, n, k, NF4_BLOCKSIZE=weight.blocksize, BLOCK_N=32, BLOCK_K=64
    )
    return out


def _weight_operands(weight):
    """The kernel arguments for the frozen W, dense or NF4: ``(W, W_packed, W_absmax, W_code)``,
    its strides ``(stride_wn, stride_wk)``, and the constexprs."""
    if isinstance(weight, Nf4Weight):
        pointers = (None, weight.packed, weight.absmax, weight.code)
        return pointers, (weight.shape[1], 1), {"HAS_NF4_WEIGHT": True, "NF4_BLOCKSIZE": weight.blocksize}
    return (weight, None, None, None), weight.stride(), {"HAS_NF4_WEIGHT": False, "NF4_BLOCKSIZE": 1}


@functools.cache
def _target_programs(device):
    """Programs that fill the device: two per SM (a fixed small number under the interpreter)."""
    if INTERPRETED:
        return _INTERPRETER_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _split(blocks, max_split, device):
    """How many ways to split a reduction so ``blocks`` x split programs fill the device."""
    return max(1, min(max_split, triton.cdiv(_target_programs(device), blocks)))


def _dot_precision(dtype):
    """fp32 dots follow torch's matmul precision (tf32 unless "highest"); 16-bit ones ignore it."""
    if dtype != torch.float32:
        return None
    return "ieee" if INTERPRETED or torch.get_float32_matmul_precision() == "highest" else "tf32"


def _common_meta(x, r):
    return {
        "UPCAST": INTERPRETED,
        "PRECISION": _dot_precision(x.dtype),
        "BLOCK_R": max(16, triton.next_power_of_2(r)),
    }


def dora_row_norm(weight, lora_a, lora_b, scale):
    """‖W_j + s·B_j A‖ for every output row j, in fp32, without forming the ``[n, k]`` matrix.

    ``‖W_j + s B_j A‖² = ‖W_j‖² + 2s·Σ_q B_jq (W Aᵀ)_jq + s²·B_j (A Aᵀ) B_jᵀ``. W Aᵀ (n·k·r
    FLOPs, next to the T·n·k of the base GEMM) is ``_lora_down`` with W in place of X: one read
    of W in its own dtype, accumulated in fp32, where torch would first need an fp32 copy of a
    16-bit W. The rest is ``[n, r]`` or smaller, in fp32 with autocast off. The sum is clamped
    at 0 before the root, since rounding can take it below 0 where s·BA ≈ −W. A constant for
    autograd: DoRA does not differentiate through the norm.
    """
    n, k = weight.shape
    r = lora_a.shape[0]
    weight_a = torch.empty(n, r, device=weight.device, dtype=torch.float32)
    _lora_down[lambda m: (triton.cdiv(n, m["BLOCK_T"]),)](
        weight,
        lora_a,
        weight_a,
        n,
        k,
        r,
        triton.next_power_of_2(n),
        *weight.stride(),
        *lora_a.stride(),
        seed=0,
        p=0.0,
        keep_scale=1.0,
        HAS_DROPOUT=False,
        **_common_meta(weight, r),
    )
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        a, b = lora_a.float(), lora_b.float()
        squared = (
            torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
            + 2 * scale * (b * weight_a).sum(dim=1)
            + scale**2 * ((b @ (a @ a.T)) * b).sum(dim=1)
        )
    return squared.clamp_min(0).sqrt()


class FusedLoraFunction(torch.autograd.Function):
    r"""LoRA (or DoRA) linear layer with a frozen base weight, forward and backward in fused
    Triton kernels.

    Inputs: X ``[T, k]``, frozen W ``[n, k]``, optional bias ``[n]``, A ``[r, k]``, B ``[n, r]``,
    DoRA's magnitude m ``[n]`` or ``None`` (plain LoRA), scale s (α/r, or α/√r for rsLoRA),
    dropout probability p and a Philox seed. The dropout multiplier D has D_ij = 1/(1-p) where
    ``rand(seed, i·k + j) >= p`` and 0 elsewhere, and X̂ = X ⊙ D (X̂ = X when p = 0).

    Forward::

        S = X̂ Aᵀ                      [T, r]
        Y = X Wᵀ + s · S Bᵀ + 1 biasᵀ  [T, n]

    Backward, with G = ∂L/∂Y. Y_ij = Σ_c X_ic W_jc + s Σ_q S_iq B_jq + bias_j, hence::

        ∂L/∂B_jq = s Σ_i G_ij S_iq               dB = s · Gᵀ S
        ∂L/∂S_iq = s Σ_j G_ij B_jq               dS = s · G B
        S_iq = Σ_c X̂_ic A_qc                   ⇒  dA = dSᵀ X̂
        ∂L/∂X̂ = dS A,  ∂X̂_ic/∂X_ic = D_ic     ⇒  dX = G W + (dS A) ⊙ D
        dbias = Σ_i G_i·

    DoRA (m given, p = 0 so X̂ = X). With ν_j = ‖W_j + s·B_j A‖ (``dora_row_norm``; detached, a
    constant in backward, as in the paper and PEFT) and the column scale g = m / ν::

        Z = X Wᵀ + s · S Bᵀ            (the LoRA accumulator)
        Y = Z ⊙ 1 gᵀ + 1 biasᵀ         (g applied in _lora_fwd's epilogue, before the bias)

    Y_ij = g_j Z_ij + bias_j, so ∂L/∂Z = G' = G ⊙ 1 gᵀ, and the LoRA formulas hold with G'
    (each G tile is scaled as the kernels load it; G' is never stored)::

        dS = s · G' B,  dB = s · G'ᵀ S,  dA = dSᵀ X,  dX = G' W + dS A
        dbias = Σ_i G_i·                                  (unscaled: ∂Y_ij/∂bias_j = 1)
        ∂L/∂m_j = Σ_i G_ij Z_ij / ν_j = Σ_i G_ij (Y_ij − bias_j) / m_j     (Z = (Y − bias) / g)

    The last form needs the output rather than Z: _lora_grad_sb sums G ⊙ (Y − bias) over the
    tokens from the G tiles it reads anyway, and the host divides by m. m_j = 0 is not
    supported (dm_j = 0/0); m starts at ‖W_j‖, and where that is 0 PEFT's g is 0/0 already.

    W is frozen: no dW is formed. Saved for backward: X, S and the seed (D is regenerated);
    for DoRA also g, and Y if m trains. W, bias, A, B and m are parameters, saved by reference.

    W may be an ``Nf4Weight`` (QLoRA, LoRA only): the formulas are those above with W the
    dequantised weight, which _lora_fwd and _lora_grad_x form tile by tile in registers. The
    record is kept on ctx: its tensors are frozen buffers, not autograd inputs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
        T, k = x.shape
        n, r = lora_b.shape
        meta = _common_meta(x, r)
        dropout = {"seed": seed, "p": float(dropout_p), "keep_scale": _keep_scale(dropout_p)}
        is_dora = magnitude is not None
        column_scale = magnitude.float() / dora_row_norm(weight, lora_a, lora_b, scale) if is_dora else None
        weight_pointers, weight_strides, weight_meta = _weight_operands(weight)
        s = torch.empty(T, r, device=x.device, dtype=x.dtype)
        y = torch.empty(T, n, device=x.device, dtype=x.dtype)
        if T > 0:
            bucket = triton.next_power_of_2(T)
            _lora_down[lambda m: (triton.cdiv(T, m["BLOCK_T"]),)](
                x,
                lora_a,
                s,
                T,
                k,
                r,
                bucket,
                *x.stride(),
                *lora_a.stride(),
                **dropout,
                HAS_DROPOUT=dropout_p > 0,
                **meta,
            )
            _lora_fwd[lambda m: (triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(n, m["BLOCK_N"]),)](
                x,
                *weight_pointers,
                s,
                lora_b,
                bias,
                column_scale,
                y,
                T,
                n,
                k,
                r,
                bucket,
                *x.stride(),
                *weight_strides,
                *lora_b.stride(),
                float(scale),
                HAS_BIAS=bias is not None,
                HAS_COLUMN_SCALE=is_dora,
                **weight_meta,
                **meta,
            )
        y_for_dm = y if ctx.needs_input_grad[5] else None
        quantized = isinstance(weight, Nf4Weight)
        dense_weight = None if quantized else weight
        ctx.save_for_backward(x, dense_weight, bias, lora_a, lora_b, s, magnitude, column_scale, y_for_dm)
        ctx.nf4_weight = weight if quantized else None
        ctx.scale, ctx.dropout = float(scale), dropout
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, lora_a, lora_b, s, magnitude, column_scale, y = ctx.saved_tensors
        if ctx.nf4_weight is not None:
            weight = ctx.nf4_weight
        need_x, _, need_bias, need_a, need_b, need_magnitude = ctx.needs_input_grad[:6]
        T, k = x.shape
        n, r = lora_b.shape
        meta = _common_meta(x, r)
        f32 = {"device": x.device, "dtype": torch.float32}
        ds, db, da = torch.zeros(T, r, **f32), torch.zeros(n, r, **f32), torch.zeros(r, k, **f32)
        dbias = torch.zeros(n, **f32) if need_bias else None
        gy = torch.zeros(n, **f32) if need_magnitude else None
        dx = torch.empty(T, k, device=x.device, dtype=x.dtype) if need_x else None
        has_column_scale = column_scale is not None
        if T > 0:
            bucket = triton.next_power_of_2(T)
            sb_grid = lambda m: (  # noqa: E731
                triton.cdiv(T, m["BLOCK_T"]),
                _split(triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(n, m["BLOCK_N"]), x.device),
            )
            _lora_grad_sb[sb_grid](
                g,
                lora_b,
                s,
                column_scale,
                y,
                bias,
                ds,
                db,
                dbias,
                gy,
                T,
                n,
                r,
                bucket,
                *g.stride(),
                *lora_b.stride(),
                ctx.scale,
                HAS_DBIAS=need_bias,
                HAS_COLUMN_SCALE=has_column_scale,
                HAS_GY=need_magnitude,
                HAS_BIAS=bias is not None,
                **meta,
            )
            if need_a:
                a_grid = lambda m: (  # noqa: E731
                    triton.cdiv(k, m["BLOCK_K"]),
                    _split(triton.cdiv(k, m["BLOCK_K"]), triton.cdiv(T, m["BLOCK_T"]), x.device),
                )
                _lora_grad_a[a_grid](
                    ds,
                    x,
                    da,
                    T,
                    k,
                    r,
                    bucket,
                    *x.stride(),
                    **ctx.dropout,
                    HAS_DROPOUT=ctx.dropout["p"] > 0,
                    **meta,
                )
            if need_x:
                weight_pointers, weight_strides, weight_meta = _weight_operands(weight)
                _lora_grad_x[lambda m: (triton.cdiv(T, m["BLOCK_T"]) * triton.cdiv(k, m["BLOCK_K"]),)](
                    g,
                    *weight_pointers,
                    ds,
                    lora_a,
                    column_scale,
                    dx,
                    T,
                    n,
                    k,
                    r,
                    bucket,
                    *g.stride(),
                    *weight_strides,
                    *lora_a.stride(),
                    **ctx.dropout,
                    HAS_DROPOUT=ctx.dropout["p"] > 0,
                    HAS_COLUMN_SCALE=has_column_scale,
                    **weight_meta,
                    **meta,
                )
        grad_a = da.to(lora_a.dtype) if need_a else None
        grad_b = db.to(lora_b.dtype) if need_b else None
        grad_bias = dbias.to(x.dtype) if need_bias else None
        grad_magnitude = (gy / magnitude.float()).to(magnitude.dtype) if need_magnitude else None
        return dx, None, grad_bias, grad_a, grad_b, grad_magnitude, None, None, None


def fused_lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, seed=None, training=True, magnitude=None):
    """``x Wᵀ + bias + scale · dropout(x) Aᵀ Bᵀ`` through the fused kernels; with ``magnitude``,
    DoRA: ``(m / ‖W + scale·BA‖) ⊙ (x Wᵀ + scale · x Aᵀ Bᵀ) + bias``, the norm per output row.

    :param x: ``[..., k]`` activations (leading dimensions are flattened into tokens).
    :param weight: the base weight ``[n, k]``, frozen: no gradient is computed for it. A tensor,
        or an ``Nf4Weight`` (QLoRA: ``nf4_weight(linear4bit.weight)``), dequantised inside the
        GEMMs to x's dtype; not with ``magnitude`` (DoRA's norm needs the dense W).
    :param bias: ``[n]`` or ``None``.
    :param lora_a: ``[r, k]``, ``r <= 128``.
    :param lora_b: ``[n, r]``.
    :param scale: the LoRA scaling (α/r, or α/√r for rsLoRA).
    :param dropout_p: dropout probability on the LoRA input, applied only when ``training``.
        DoRA needs 0 while training: there dropout(x) also enters the W term, a second base GEMM.
    :param seed: the Philox seed of the dropout mask; ``None`` draws one from torch's CPU
        generator (reproducible under ``torch.manual_seed``).
    :param training: whether dropout applies.
    :param magnitude: DoRA's magnitude ``[n]``, or ``None`` for LoRA. It may stay in fp32
        whatever the dtype of the rest (PEFT keeps it so); the norm and m / norm are fp32.
    :return: ``[..., n]``, in x's dtype. All tensors share one device and one dtype (fp32,
        fp16 or bf16), ``magnitude`` and an NF4 weight excepted; CPU tensors need
        ``TRITON_INTERPRET=1``.
    """
    k = x.shape[-1]
    r = lora_a.shape[0]
    n = weight.shape[0]
    _check(x, weight, bias, lora_a, lora_b, magnitude, k, n, r)
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"fused_lora_linear: dropout_p must be in [0, 1], got {dropout_p}")
    if p > 0 and magnitude is not None:
        raise ValueError("fused_lora_linear: DoRA (magnitude given) needs dropout_p = 0 while training")
    if p > 0 and seed is None:
        seed = int(torch.randint(2**31 - 1, ()).item())
    y = FusedLoraFunction.apply(x.reshape(-1, k), weight, bias, lora_a, lora_b, magnitude, scale, p, seed or 0)
    return y.reshape(*x.shape[:-1], n)


def _check(x, weight, bias, lora_a, lora_b, magnitude, k, n, r):
    problems = []
    quantized = isinstance(weight, Nf4Weight)
    if quantized:
        problems += _nf4_problems(weight, magnitude)
    elif weight.requires_grad and torch.is_grad_enabled():
        problems.append("weight must be frozen (requires_grad=False): dW is never computed")
    expected = {
        "weight": (weight, (n, k)),
        "lora_a": (lora_a, (r, k)),
        "lora_b": (lora_b, (n, r)),
        "bias": (bias, (n,)),
        "magnitude": (magnitude, (n,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not 1 <= r <= MAX_RANK:
        problems.append(f"rank {r} is outside 1..{MAX_RANK}")
    tensors = [t for t in (x, None if quantized else weight, bias, lora_a, lora_b) if t is not None]
    if x.dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {x.dtype} is not one of fp32, fp16, bf16")
    if any(t.dtype != x.dtype for t in tensors):
        dtypes = ", ".join(str(t.dtype) for t in tensors)
        problems.append(f"dtypes differ ({dtypes}): cast to one dtype first")
    nf4_tensors = [weight.packed, weight.absmax, weight.code] if quantized else []  # dtypes: _nf4_problems
    on_devices = tensors + nf4_tensors + ([] if magnitude is None else [magnitude])
    if any(t.device != x.device for t in on_devices):
        problems.append("tensors are on different devices")
    if x.device.type == "cpu" and not INTERPRETED:
        problems.append("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before this module is imported")
    if problems:
        raise ValueError("fused_lora_linear: " + "; ".join(problems))


def _nf4_problems(weight, magnitude):
    n, k = weight.shape
    blocksize = weight.blocksize
    problems = []
    if magnitude is not None:
        problems.append("DoRA (magnitude given) needs a dense weight: its row norms read W")
    if blocksize < 2 or blocksize % 2:
        return problems + [f"NF4 blocksize {blocksize} is not even"]  # _load_nf4 relies on it
    expected = {
        "packed": (torch.uint8, triton.cdiv(n * k, 2)),
        "absmax": (torch.float32, triton.cdiv(n * k, blocksize)),
        "code": (torch.float32, 16),
    }
    for name, (dtype, numel) in expected.items():
        tensor = getattr(weight, name)
        if tensor.dtype != dtype or tensor.numel() != numel:
            problems.append(f"NF4 {name} is {tensor.numel()} x {tensor.dtype}, expected {numel} x {dtype}")
    return problems


# --------------------------------------------------------------------------------------------
# mixed-adapter batches: one adapter per row (serving)
# --------------------------------------------------------------------------------------------

# Under the interpreter: small blocks, and BLOCK_R 16 so that a stack of rank > 16 takes two
# rank slices. On GPU: autotuned; one program computes an output tile from its row's whole
# X Aᵀ, so a wide BLOCK_N spreads that (redundant per column block) product over more outputs,
# while a narrow one gives short batches more programs. Ranks up to MAX_RANK are one slice:
# a runtime loop over slices took every config to 255 registers on sm_90 (ptxas), so the
# slices are unrolled (RANK_SLICES) and only ranks above MAX_RANK take more than one.
_ROWS_INTERPRETER_META = {"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_K": 32}
_ROWS_CONFIGS = [
    triton.Config({"BLOCK_T": t, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=3)
    for t, n, k, warps in [
        (16, 64, 128, 4),
        (16, 128, 128, 4),
        (16, 256, 64, 4),
        (32, 128, 64, 4),
        (64, 128, 64, 4),
        (128, 128, 64, 8),
    ]
]


def _prune_rows(configs, named_args, **kwargs):
    return [triton.Config(_ROWS_INTERPRETER_META)] if INTERPRETED else configs


@triton.autotune(
    _ROWS_CONFIGS,
    key=["T_BUCKET", "n", "k", "r", "HAS_COLUMN_SCALE"],
    restore_value=["Y"],  # the kernel adds into Y: each tuning run must start from the base output
    prune_configs_by={"early_config_prune": _prune_rows},
)
@triton.jit
def _lora_rows(
    X,
    Y,
    adapter_of_row,
    A,
    B,
    scaling,
    column_scale,
    bias,
    T,
    n,
    k,
    r,
    T_BUCKET,
    stride_xrow,
    stride_xt,
    stride_xk,
    stride_aa,
    stride_ar,
    stride_ak,
    stride_ba,
    stride_bn,
    stride_br,
    stride_ga,
    HAS_COLUMN_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RANK_SLICES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Y[i] += s_a · (X[i] A_aᵀ) B_aᵀ in place, a = adapter_of_row[i] (rows with a < 0 are left
    as they are); with HAS_COLUMN_SCALE: Y[i] = Y[i] + (g_a − 1) ⊙ (Y[i] − bias) + g_a ⊙ s_a ·
    (X[i] A_aᵀ) B_aᵀ, DoRA's eval-mode output from the base output (g_a = 1 for plain LoRA).

    Program (column block, token block, row). The rank-r product S = X[i] A_aᵀ is computed in
    RANK_SLICES slices of BLOCK_R, each reduced over k and then multiplied into the output tile,
    so any rank runs; A, B are read straight from the stacks by the row's adapter index
    (nothing gathered).
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    row = tl.program_id(2)
    adapter = tl.load(adapter_of_row + row).to(tl.int64)
    if adapter >= 0:
        tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        x_row = X + row.to(tl.int64) * stride_xrow
        a_adapter = A + adapter * stride_aa
        b_adapter = B + adapter * stride_ba
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for rank_slice in tl.static_range(RANK_SLICES):
            ranks = rank_slice * BLOCK_R + tl.arange(0, BLOCK_R)
            s = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, k, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                x = _load(x_row, tokens, cols, stride_xt, stride_xk, T, k).to(A.dtype.element_ty)
                a_t = _load(a_adapter, cols, ranks, stride_ak, stride_ar, k, r)
                s = _mma(x, a_t, s, UPCAST, PRECISION)
            b_t = _load(b_adapter, ranks, outs, stride_br, stride_bn, r, n)
            acc = _mma(s.to(B.dtype.element_ty), b_t, acc, UPCAST, PRECISION)
        acc *= tl.load(scaling + adapter).to(tl.float32)
        y_row = Y + row.to(tl.int64) * T * n
        y = _load(y_row, tokens, outs, n, 1, T, n).to(tl.float32)
        if HAS_COLUMN_SCALE:
            g = tl.load(column_scale + adapter * stride_ga + outs, mask=outs < n, other=1.0).to(tl.float32)[None, :]
            direction = y
            if HAS_BIAS:
                direction = y - tl.load(bias + outs, mask=outs < n, other=0.0).to(tl.float32)[None, :]
            y = y + (g - 1.0) * direction + g * acc
        else:
            y = y + acc
        _store(y_row, tokens, outs, T, n, y)


def mixed_lora_(y, x, adapter_of_row, lora_a, lora_b, scaling, column_scale=None, bias=None):
    """Add each row's own LoRA update to the base output ``y``, in place, in one launch (the
    BGMV/SGMV idea of Punica and S-LoRA): ``y[i] += scaling[a] · (x[i] A_aᵀ) B_aᵀ`` with
    ``a = adapter_of_row[i]``; rows with ``a = −1`` keep the base output. With ``column_scale``
    (DoRA): ``y[i] += (g_a − 1) ⊙ (y[i] − bias) + g_a ⊙ scaling[a] · (x[i] A_aᵀ) B_aᵀ``, the
    eval-mode DoRA output given its precomputed ``g_a = m / ‖W + ΔW‖`` (ones for LoRA adapters).

    Forward only (no autograd): for inference. The update is computed in the stacks' dtype
    (fp32 as ``lora`` keeps them: x is cast to it, as the eager path casts it), fp32 dots follow
    torch's matmul precision, and the sum with ``y`` is formed in fp32 and rounded once to y's
    dtype.

    :param y: the base output ``[rows, ..., n]``, contiguous; updated and returned.
    :param x: the input ``[rows, ..., k]`` (any strides, any float dtype).
    :param adapter_of_row: ``[rows]`` integer adapter indices into the stacks, −1 for none.
    :param lora_a: ``[adapters, r, k]``: every adapter's A, ranks padded with zeros to ``r``
        (any strides: a transposed view of an ``[adapters, k, r]`` stack is read in place).
    :param lora_b: ``[adapters, n, r]``, padded alike.
    :param scaling: ``[adapters]`` scaling factors (α/r, or α/√r for rsLoRA).
    :param column_scale: ``[adapters, n]`` or ``None``.
    :param bias: the base layer's bias ``[n]`` or ``None``; read only with ``column_scale``.
    """
    rows, k, n = x.shape[0], x.shape[-1], y.shape[-1]
    adapters, r = lora_a.shape[0], lora_a.shape[1]
    problems = []
    expected = {
        "y": (y, (*x.shape[:-1], n)),
        "adapter_of_row": (adapter_of_row, (rows,)),
        "lora_a": (lora_a, (adapters, r, k)),
        "lora_b": (lora_b, (adapters, n, r)),
        "scaling": (scaling, (adapters,)),
        "column_scale": (column_scale, (adapters, n)),
        "bias": (bias, (n,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not y.is_contiguous():
        problems.append("y must be contiguous")
    if lora_a.dtype != lora_b.dtype:
        problems.append(f"lora_a is {lora_a.dtype} but lora_b {lora_b.dtype}")
    if adapter_of_row.dtype.is_floating_point:
        problems.append("adapter_of_row must hold integers")
    tensors = [t for t, _ in expected.values() if t is not None] + [x]
    if any(t.device != y.device for t in tensors):
        problems.append("tensors are on different devices")
    if y.device.type == "cpu" and not INTERPRETED:
        problems.append("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before this module is imported")
    if problems:
        raise ValueError("mixed_lora_: " + "; ".join(problems))
    x3 = x.reshape(rows, -1, k)
    T = x3.shape[1]
    adapter_of_row, scaling = adapter_of_row.contiguous(), scaling.contiguous()
    column_scale = None if column_scale is None else column_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    if rows == 0 or T == 0 or adapters == 0 or r == 0:
        return y
    block_r = 16 if INTERPRETED else min(MAX_RANK, max(16, triton.next_power_of_2(r)))
    _lora_rows[lambda m: (triton.cdiv(n, m["BLOCK_N"]), triton.cdiv(T, m["BLOCK_T"]), rows)](
        x3,
        y,
        adapter_of_row,
        lora_a,
        lora_b,
        scaling,
        column_scale,
        bias,
        T,
        n,
        k,
        r,
        triton.next_power_of_2(T),
        *x3.stride(),
        *lora_a.stride(),
        *lora_b.stride(),
        0 if column_scale is None else column_scale.stride(0),
        HAS_COLUMN_SCALE=column_scale is not None,
        HAS_BIAS=bias is not None,
        UPCAST=INTERPRETED,
        PRECISION=_dot_precision(lora_a.dtype),
        BLOCK_R=block_r,
        RANK_SLICES=triton.cdiv(r, block_r),
    )
    return y
