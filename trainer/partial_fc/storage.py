"""ShardStorage: in which format and where the shard's rows live, and how rows move.

The class centres (`PartialFC.weight`) and every optimiser state of the same shape (the
momentum; later AdamW's moments) are "stores": [num_local, D] tensors in the storage
dtype (fp32, or bf16 / fp16 to halve their memory), on the compute device or, with
host offload, in host memory (pinned on CUDA machines). The math never changes: the
rows a step needs are gathered and converted to the compute dtype on the compute
device (`read_rows`), and updated rows are written back (`write_rows`) with stochastic
rounding to 16 bits, so an update smaller than half a 16-bit ulp still moves a value by
that amount on average (round-to-nearest would drop it).

With host offload, rows travel in chunks of ROW_CHUNK through host staging buffers and
device twins. Reads alternate between two host buffers, so gathering one chunk on the
host overlaps the copy of the previous one to the device. Writes are staged and land in
the host store at the next `flush` (PartialFC's forward calls it first); on CUDA the
copies run on a side stream, so the write-back overlaps what runs until then. On a CPU
device the same code runs with host = device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.partial_fc.sharding import mixed_seed

# partial_fc.storage -> the dtype the shard and its momentum are kept in (None: compute dtype).
STORAGE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}
OFFLOADS = ("none", "host")
ROUNDINGS = ("stochastic", "nearest")
# Rows converted / rounded / staged per chunk when reading or writing 16-bit or offloaded storage.
ROW_CHUNK = 4096
FP16_MAX = 65504.0


def _round_bf16_stochastic(x: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 → bf16 with stochastic rounding; `x` (contiguous fp32) is clobbered.

    bf16 is the upper half of an fp32. Adding a uniform random 16-bit integer to the
    fp32 bit pattern and dropping the lower half carries into the kept part with
    probability (dropped bits)/2¹⁶, i.e. rounds the magnitude up with probability equal
    to the distance from the lower bf16 neighbour in ulps: unbiased, for either sign
    (sign-magnitude format). ±inf stay ±inf (their low half is zero). A NaN is put back
    after the bit arithmetic: the noise would carry CUDA's NaN 0x7FFFFFFF into the sign
    bit (→ −0) and truncate a NaN with only low mantissa bits to ±inf.
    """
    nan = x.isnan()
    bits = x.view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32
    )
    bits.add_(noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000
    x.masked_fill_(nan, float("nan"))
    return x.to(torch.bfloat16)  # exact: the low 16 bits are zero (NaN: bf16's NaN)


def _check_fp16_range(x: Tensor) -> None:
    """Raise instead of letting fp16 storage overflow to inf (or store a NaN)."""
    peak = x.abs().amax()
    if not bool(peak <= FP16_MAX):  # one host read per chunk; NaN fails too
        raise FloatingPointError(
            f"partial_fc.storage=fp16: a class-centre or momentum value reached {float(peak):.4g}, "
            f"outside the fp16 range ±{FP16_MAX:g} (or not finite); the update was stopped "
            "part-way. Use partial_fc.storage=bf16 (fp32's range) or a lower learning rate, "
            "and resume from the last checkpoint"
        )


def _round_fp16_stochastic(x: Tensor, generator: torch.Generator) -> Tensor:
    """fp32 → fp16 with stochastic rounding (unbiased): with u the fp16 ulp at |x| (2⁻²⁴
    in the subnormal range), |x| = (k + f)·u with k integer, 0 <= f < 1; store (k + 1)·u
    with probability f, else k·u. Every step is exact in fp32. Raises FloatingPointError
    if |x| > 65504 or x is not finite (fp16 would store inf; any NaN bit pattern fails)."""
    _check_fp16_range(x)
    a = x.abs()
    exponent = (a.view(torch.int32) >> 23) - 127  # floor(log2 |x|) for normal fp32
    ulp = ((exponent - 10).clamp_(min=-24) + 127).bitwise_left_shift_(23).view(torch.float32)
    a.div_(ulp)  # = k + f, exact (power of two)
    k = a.floor()
    a.sub_(k)  # f
    k.add_(torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < a)
    return k.mul_(ulp).copysign_(x).to(torch.float16)  # exact: representable in fp16


def round_to_storage(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> Tensor:
    """`x` (contiguous, compute dtype) rounded to the 16-bit storage `dtype`: stochastically
    with `generator`, to nearest when it is None. `x` may be clobbered."""
    if x.dtype != torch.float32:
        x = x.float()
    if dtype == torch.float16:
        if generator is None:
            _check_fp16_range(x)
            return x.to(dtype)
        return _round_fp16_stochastic(x, generator)
    if dtype == torch.bfloat16:
        return x.to(dtype) if generator is None else _round_bf16_stochastic(x, generator)
    raise ValueError(f"no 16-bit rounding to {dtype}")


def _wait(event) -> None:
    """Block the host until a copy's CUDA event has completed (None: a CPU copy, done)."""
    if event is not None:
        event.synchronize()


class ShardStorage:
    """Format, place and row traffic of a shard's stores (see the module docstring).

    `dtype`, `device` and `pin` are the stores' dtype, device and pinning (`new_store`
    makes one; PartialFC makes `weight` with them); `compute_device` and
    `compute_dtype` are where and in which dtype rows are read to and written from.
    `copies_rows` is False only for fp32 storage on the compute device, where the
    stores can be used in place.
    """

    def __init__(
        self,
        *,
        compute_dtype: torch.dtype,
        compute_device: torch.device,
        kind: str = "fp32",
        offload: str = "none",
        rounding: str = "stochastic",
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        for name, value, allowed in (
            ("storage", kind, tuple(STORAGE_DTYPES)), ("offload", offload, OFFLOADS),
            ("rounding", rounding, ROUNDINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.kind, self.offload, self.rounding = kind, offload, rounding
        self.compute_dtype, self.compute_device = compute_dtype, compute_device
        self.dtype = STORAGE_DTYPES[kind] or compute_dtype
        self.device = torch.device("cpu") if offload == "host" else compute_device
        # Host memory the GPU copies from/to asynchronously must be pinned.
        self.pin = offload == "host" and torch.cuda.is_available()
        self.copies_rows = self.dtype != compute_dtype or offload == "host"
        self._seed, self._rank = seed, rank
        self._buffers: dict[str, Tensor] = {}  # staging buffers by name, kept across steps
        self._read_slot = 0  # the host read buffer ("in0"/"in1") the next chunk uses
        self._read_busy: list[object] = [None, None]  # CUDA event of each one's last copy
        self._pending: list[tuple[Tensor, Tensor, Tensor, object]] = []  # writes to land
        self._side_stream = None  # CUDA + host offload: the copy stream (created lazily)

    def new_store(self, like: Tensor) -> Tensor:
        """A zeroed store shaped like `like` (an optimiser state of the shard)."""
        return torch.zeros(
            like.shape, dtype=self.dtype, device=self.device, pin_memory=self.pin
        )

    def rounding_generator(self, step: int) -> torch.Generator | None:
        """The generator for one update's stochastic rounding (pass it to every
        `write_rows` of that update), a pure function of (seed, step, rank); None when
        nothing is rounded (storage in the compute dtype, or rounding "nearest")."""
        if self.dtype == self.compute_dtype or self.rounding == "nearest":
            return None
        g = torch.Generator(device=self.compute_device)
        return g.manual_seed(mixed_seed(2, self._seed, step, self._rank))

    def read_rows(self, store: Tensor, rows: Tensor, out: Tensor) -> Tensor:
        """Rows `rows` (indices on the store's device) of `store` into `out` (compute
        dtype and device); returns `out`. Writes still pending (host offload) are not
        seen: `flush` first."""
        if not self.copies_rows:
            return torch.index_select(store, 0, rows, out=out)
        for lo in range(0, rows.numel(), ROW_CHUNK):
            idx = rows[lo : lo + ROW_CHUNK]
            self._read_chunk(store, idx, out[lo : lo + idx.numel()])
        return out

    def _read_chunk(self, store: Tensor, idx: Tensor, dst: Tensor) -> None:
        slot, self._read_slot = self._read_slot, 1 - self._read_slot
        _wait(self._read_busy[slot])  # the copy that last read this buffer (two chunks ago)
        stage = self._buffer(f"in{slot}", idx.numel(), store, self.device, self.pin)
        torch.index_select(store, 0, idx, out=stage)
        if self.offload == "host":
            dev = self._buffer(f"in_dev{slot}", idx.numel(), store, self.compute_device)
            self._read_busy[slot] = self._copy(dev, stage, wait=True)
            stage = dev
        dst.copy_(stage)  # to the compute dtype, on the compute device

    def write_rows(
        self, store: Tensor, rows: Tensor, values: Tensor, generator: torch.Generator | None
    ) -> None:
        """Write `values` (compute dtype and device; clobbered) into rows `rows` of
        `store`, rounded to its dtype (stochastically with `generator`, else to nearest).
        With host offload the rows land in `store` at the next `flush` (`values` may be
        reused at once: they are staged)."""
        if not self.copies_rows:
            store.index_copy_(0, rows, values)
            return
        for lo in range(0, values.shape[0], ROW_CHUNK):
            idx, part = rows[lo : lo + ROW_CHUNK], values[lo : lo + ROW_CHUNK]
            if part.dtype != store.dtype:
                part = round_to_storage(part, store.dtype, generator)
            if self.offload != "host":
                store.index_copy_(0, idx, part)
                continue
            name = f"out{len(self._pending)}"  # one pair per pending chunk until `flush`
            dev = self._buffer(name + "_dev", idx.numel(), store, self.compute_device)
            dev.copy_(part)
            host = self._buffer(name, idx.numel(), store, self.device, self.pin)
            self._pending.append((store, idx, host, self._copy(host, dev, wait=False)))

    def flush(self) -> None:
        """Land the pending host-offload writes in their stores (none without offload).
        Call it before reading a store directly (a checkpoint) or its rows."""
        for store, idx, host, event in self._pending:
            _wait(event)
            store.index_copy_(0, idx, host)
        self._pending.clear()

    # -- staging buffers and copies; the only CUDA-specific code ------------------------
    def _buffer(
        self, name: str, rows: int, like: Tensor, device: torch.device, pin: bool = False
    ) -> Tensor:
        """The first `rows` rows of staging buffer `name` (`like`'s dtype and row shape, on
        `device`, pinned if `pin`), grown when too small. The caller makes sure no copy
        still uses it."""
        buf = self._buffers.get(name)
        if (
            buf is None or buf.shape[0] < rows or buf.shape[1:] != like.shape[1:]
            or buf.dtype != like.dtype or buf.device != device
        ):
            shape = (rows, *like.shape[1:])
            buf = torch.empty(shape, dtype=like.dtype, device=device, pin_memory=pin)
            self._buffers[name] = buf
        return buf[:rows]

    def _copy(self, dst: Tensor, src: Tensor, wait: bool):
        """dst.copy_(src); between host and a CUDA device: on a side stream, ordered after
        the work queued so far (and, if `wait`, the current stream waits for it; a
        write-back does not, so the next step's kernels run during the copy); returns the
        copy's CUDA event (None on CPU). `src` and `dst` must stay untouched until the
        event has completed (`_read_chunk`, `flush`)."""
        if self.compute_device.type != "cuda":
            dst.copy_(src)
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.compute_device)
        side, main = self._side_stream, torch.cuda.current_stream(self.compute_device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        if wait:
            main.wait_stream(side)
        return event
