"""Where the Engram tables live, and how their rows reach the layer.

A table is either on the model's device ("device": HBM on a GPU) or in pinned host memory ("host"), chosen per
Engram layer by ``config.engram_table_placement`` (one value, or one per Engram layer), at load time
(``from_pretrained(..., engram_table_placement="host")``) or later (``model.set_engram_table_placement``).

A host table is an ordinary CPU parameter whose memory is page-locked with ``cudaHostRegister``. Under CUDA's
unified virtual addressing a kernel can read such memory directly, so the lookup kernel reads the addressed
rows over PCIe (UVA) from a CUDA view of the table: no copy of the table to the GPU, no host round trip of the
ids. Only the rows a batch needs move: `(N-1) * K * D` elements per token and layer.

Hash ids depend only on the input ids, so as soon as the model has the ids it issues every host table's gather
on a side CUDA stream (``prepare_engram_inputs``); the layers before an Engram layer run meanwhile and the layer
waits on an event just before it needs its memory (``EngramMemory.wait``). Device tables are gathered in the
same place, on the main stream.

``.to(device)``, ``.cuda()`` and accelerate's placement leave a host table on the host (dtype changes still
apply); ``engram_device_map`` turns a single-device ``device_map`` into one that leaves host tables out, which is
what ``EngramMoEPreTrainedModel.from_pretrained`` uses, so a checkpoint whose tables exceed GPU memory loads.
This file imports only torch (and its sibling), so the remote-code export works.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn

from .engram_kernels import engram_hash, hash_gather, resolve_kernel_mode

PLACEMENTS = ("device", "host")
_AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# cudaHostRegisterPortable | cudaHostRegisterMapped: visible to every device, mapped into the UVA space.
_HOST_REGISTER_FLAGS = 1 | 2
# Host copies move in chunks so that pinning a table never needs a second full-size anonymous copy at once.
_COPY_CHUNK_BYTES = 1 << 30
_MADV_HUGEPAGE = 14


def layer_placement(config, engram_index: int) -> str:
    """The placement ("device" or "host") of the table of the `engram_index`-th Engram layer."""
    placement = config.engram_table_placement
    return placement if isinstance(placement, str) else placement[engram_index]


# ---------------------------------------------------------------------------------------------- pinned memory


class PinnedHostBuffer:
    """A CPU tensor page-locked in place with `cudaHostRegister`, unregistered when this object goes away.

    torch's pinned allocator rounds every allocation up to a power of two (a 70 GB table would take 128 GB), so we
    register ordinary host memory instead. The buffer keeps its tensor alive, so the memory is unregistered before
    it can be freed.
    """

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("PinnedHostBuffer needs a contiguous CPU tensor.")
        self.tensor = tensor
        self.ptr = tensor.data_ptr()
        self.registered = False
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            error = int(torch.cuda.cudart().cudaHostRegister(self.ptr, nbytes, _HOST_REGISTER_FLAGS))
            if error != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {error}.")
            self.registered = True

    def __del__(self):
        if getattr(self, "registered", False):
            try:
                torch.cuda.cudart().cudaHostUnregister(self.ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may already be gone
                pass


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back a large, not yet touched host tensor with transparent huge pages (fewer page-table
    entries to walk on random reads over PCIe). Best effort: False where it is not available."""
    nbytes = tensor.numel() * tensor.element_size()
    if sys.platform != "linux" or nbytes < (64 << 20):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = 4096
        start = (tensor.data_ptr() + page - 1) // page * page
        length = (tensor.data_ptr() + nbytes - start) // page * page
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def pinned_host_copy(tensor: torch.Tensor, huge_pages: bool = True) -> PinnedHostBuffer:
    """A page-locked host copy of `tensor` (any device), copied in 1 GiB chunks."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    if huge_pages:
        advise_huge_pages(out)
    flat_in, flat_out = tensor.detach().reshape(-1), out.view(-1)
    step = max(1, _COPY_CHUNK_BYTES // max(1, tensor.element_size()))
    for start in range(0, flat_in.numel(), step):
        flat_out[start : start + step].copy_(flat_in[start : start + step])
    return PinnedHostBuffer(out)


class _CudaArrayView:
    """Just enough of `__cuda_array_interface__` for `torch.as_tensor` to wrap a UVA pointer."""

    _TYPESTR = {1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}

    def __init__(self, tensor: torch.Tensor):
        self.__cuda_array_interface__ = {
            "shape": tuple(tensor.shape),
            "typestr": self._TYPESTR[tensor.element_size()],
            "data": (tensor.data_ptr(), False),
            "strides": None,
            "version": 3,
        }


def cuda_view_of_host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor aliasing pinned host memory (UVA): CUDA kernels reading it fetch over PCIe.

    The view does not own the memory: keep the host tensor (and its `PinnedHostBuffer`) alive while it is used.
    Bytes are wrapped as an integer type of the same width and viewed back, since the CUDA array interface has
    no bfloat16.
    """
    if not tensor.is_contiguous():
        raise ValueError("cuda_view_of_host needs a contiguous tensor.")
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    with torch.cuda.device(device):
        view = torch.as_tensor(_CudaArrayView(tensor), device=device)
    return view.view(int_dtype).view(tensor.dtype)


# ---------------------------------------------------------------------------------------------- table module


class EngramTable(nn.Embedding):
    """The embedding table of one Engram layer: an `nn.Embedding` that can stay in pinned host memory.

    With `host_resident=True`, moves of the module (`.to`, `.cuda`, `_apply`) convert its dtype but leave it on
    the host; the first move to a CUDA device page-locks it. `reader(device)` returns the tensor a kernel on
    `device` reads rows from: the weight itself, a UVA view of the pinned host weight, or None when the rows
    must be gathered where the table is (the reference path).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, host_resident: bool = False, **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.host_resident = host_resident
        self._pinned: PinnedHostBuffer | None = None
        self._pinned_ptr: int | None = None
        self._uva: dict[torch.device, torch.Tensor] = {}

    def _set_weight(self, tensor: torch.Tensor) -> None:
        # Like nn.Module._apply: swap the data in place where the tensor types allow it (keeps optimizer references),
        # otherwise a new Parameter (meta -> CPU).
        if torch._has_compatible_shallow_copy_type(self.weight, tensor):
            self.weight.data = tensor
        else:
            self.weight = nn.Parameter(tensor, requires_grad=self.weight.requires_grad)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", host_resident=True" if self.host_resident else "")

    def _apply(self, fn, recurse=True):
        if not self.host_resident:
            return super()._apply(fn, recurse)
        weight = self.weight
        # Learn what `fn` does from an empty probe: apply its dtype change here, never its device move.
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        fresh = False
        with torch.no_grad():
            if weight.device.type == "meta" and probe.device.type != "meta":
                # Materialising (to_empty): allocate on the host, never on the device.
                fresh_table = torch.empty(weight.shape, dtype=probe.dtype, device="cpu")
                advise_huge_pages(fresh_table)
                self._set_weight(fresh_table)
                fresh = True
            elif probe.dtype != weight.dtype or weight.device.type not in ("cpu", "meta"):
                self._set_weight(weight.detach().to(device="cpu", dtype=probe.dtype))
                fresh = True
        if probe.device.type == "cuda":
            self.pin(in_place=fresh)
        return self

    def pin(self, in_place: bool = False) -> None:
        """Page-lock the host weight (once; again only if the weight tensor was replaced).

        `in_place=True` registers the weight's own memory (for memory this module just allocated: no second copy
        of a huge table); otherwise a pinned copy replaces it, since the weight may be a read-only file mapping
        (safetensors loads are memory-mapped) that cannot be registered.
        """
        weight = self.weight
        if (
            weight.device.type != "cpu"
            or not torch.cuda.is_available()
            or self._pinned_ptr == weight.data_ptr()
        ):
            return
        self._uva.clear()
        if weight.is_pinned() and weight.is_contiguous():
            self._pinned = None  # pinned by someone else (e.g. built with pin_memory=True): nothing to own
        else:
            with torch.inference_mode(False), torch.no_grad():
                if in_place and weight.is_contiguous():
                    buffer = PinnedHostBuffer(weight.detach())
                else:
                    buffer = pinned_host_copy(weight)
                    self._set_weight(buffer.tensor)
            self._pinned = buffer
        self._pinned_ptr = self.weight.data_ptr()

    def place(self, placement: str, device: torch.device | None = None) -> None:
        """Move the table to `placement` ("host": pinned host memory; "device": `device`)."""
        if placement not in PLACEMENTS:
            raise ValueError(f"Engram table placement {placement!r} must be one of {PLACEMENTS}.")
        self.host_resident = placement == "host"
        self._uva.clear()
        with torch.no_grad():
            serving_gpu = device is not None and torch.device(device).type == "cuda"
            if placement == "host" and self.weight.device.type == "cuda" and serving_gpu:
                # Straight into fresh (huge-page advised) host memory, registered there: one host copy.
                buffer = pinned_host_copy(self.weight)
                self._set_weight(buffer.tensor)
                self._pinned, self._pinned_ptr = buffer, buffer.tensor.data_ptr()
            elif placement == "host":
                moved = self.weight.device.type != "cpu"
                if moved:
                    self._set_weight(self.weight.detach().to("cpu"))
                if serving_gpu:
                    self.pin(in_place=moved)
            else:
                if device is not None:
                    self._set_weight(self.weight.detach().to(device))
                # Unregisters the old host memory (after the copy: it was still the weight until then).
                self._pinned, self._pinned_ptr = None, None

    def reader(self, device: torch.device) -> torch.Tensor | None:
        """The tensor a kernel running on `device` reads this table's rows from (None: gather on the table's device)."""
        weight = self.weight
        device = torch.device(device)
        if weight.device == device or (weight.device.type == device.type and device.index is None):
            return weight
        if weight.device.type != "cpu" or device.type != "cuda":
            return None
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.pin()
        weight = self.weight
        if self._pinned_ptr != weight.data_ptr():
            return None
        view = self._uva.get(device)
        if view is None or view.data_ptr() != weight.data_ptr() or view.dtype != weight.dtype:
            view = cuda_view_of_host(weight.detach(), device)
            self._uva[device] = view
        return view


# ---------------------------------------------------------------------------------------------- prefetch


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


class EngramMemory:
    """The memory vectors `e_t` of one Engram layer, possibly still being gathered on a side stream."""

    __slots__ = ("tensor", "event", "prefetched")

    def __init__(self, tensor: torch.Tensor, event: torch.cuda.Event | None = None):
        self.tensor = tensor
        self.event = event
        self.prefetched = event is not None

    def wait(self) -> torch.Tensor:
        """Make the current stream wait for the gather, then hand over the tensor (to the current stream)."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.tensor.device)
            stream.wait_event(self.event)
            # Allocated on the side stream, used on this one: keep the allocator from reusing it too early.
            self.tensor.record_stream(stream)
            self.event = None
        return self.tensor


def resolve_memory(memory):
    """`EngramLayer.forward` accepts a tensor or an `EngramMemory`: the tensor, once it is ready."""
    return memory.wait() if isinstance(memory, EngramMemory) else memory


def _gather_layer(layer, slot, ids, multipliers, moduli, out_dtype, mode, prefetch):
    source = layer.embedding.reader(ids.device)
    if source is None:
        return None  # the table is where the kernels cannot read it: the reference path gathers it
    weight = layer.embedding.weight
    use_triton = mode == "triton"
    args = (ids, multipliers[slot], moduli[slot], layer.offsets, weight, source, out_dtype, use_triton)
    side_stream = prefetch == "all" or (prefetch == "host" and source is not weight)
    if not side_stream or ids.device.type != "cuda":
        return EngramMemory(hash_gather(*args))
    main = torch.cuda.current_stream(ids.device)
    side = _side_stream(ids.device)
    side.wait_stream(main)  # the ids were computed on the main stream
    with torch.cuda.stream(side):
        tensor = hash_gather(*args)
        event = torch.cuda.Event()
        event.record(side)
    ids.record_stream(side)
    return EngramMemory(tensor, event)


def prepare_engram_inputs(model, input_ids, padding_mask, cache, out_dtype):
    """Everything the Engram layers need for one forward: `(hash_ids or None, {layer_idx: EngramMemory})`.

    Fast paths (`config.engram_kernels` not "reference") gather each layer's memory here, host tables on a side
    stream; layers left to the reference path get the `[B, T, L, H]` hash ids instead.
    """
    config = model.config
    ids = model.engram_context_ids(input_ids, padding_mask, cache)
    mode = resolve_kernel_mode(config.engram_kernels, ids.device)
    memories = {}
    if mode != "reference":
        for slot, layer in enumerate(model.engram_layers):
            memory = _gather_layer(
                layer,
                slot,
                ids,
                model.engram_multipliers,
                model.engram_moduli,
                out_dtype,
                mode,
                config.engram_prefetch,
            )
            if memory is not None:
                memories[layer.layer_idx] = memory
    hash_ids = None
    if len(memories) < len(config.engram_layer_ids):
        if mode == "triton":
            hash_ids = engram_hash(
                ids, model.engram_multipliers, model.engram_moduli, config.engram_max_ngram_size
            )
        else:
            from .modeling_engram import hash_ngrams  # noqa: PLC0415 - import cycle

            hash_ids = hash_ngrams(
                ids, model.engram_multipliers, model.engram_moduli, config.engram_max_ngram_size
            )
    return hash_ids, memories


# ---------------------------------------------------------------------------------------------- loading


def host_table_names(config, prefix: str = "") -> list[str]:
    """Module names of the host-placed tables (e.g. `model.layers.1.engram.embedding`)."""
    return [
        f"{prefix}layers.{layer_id}.engram.embedding"
        for index, layer_id in enumerate(config.engram_layer_ids)
        if layer_placement(config, index) == "host"
    ]


def _map_around(module: nn.Module, prefix: str, device, excluded: list[str], out: dict) -> None:
    """Assign `device` to every submodule/tensor of `module` except the `excluded` module names, as coarsely as
    possible (whole subtrees where no excluded module lies below)."""
    for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        out[prefix + name] = device
    for name, child in module.named_children():
        full = prefix + name
        if full in excluded:
            continue
        if any(e.startswith(full + ".") for e in excluded):
            _map_around(child, full + ".", device, excluded, out)
        else:
            out[full] = device


def engram_device_map(model_class, config, device_map, max_memory=None):
    """A `device_map` for `from_pretrained` that leaves the host-placed Engram tables out (they load to the CPU).

    Single-device maps (`"cuda"`, `0`, `torch.device`, `{"": device}`) become an explicit per-module map of that
    device without the tables, so transformers neither loads the tables to the GPU nor dispatches offload hooks.
    "auto"-style maps are computed by accelerate for a skeleton without the tables, then split the same way.
    Other dicts are returned with any entry that covers a host table split around it.
    """
    prefix = f"{model_class.base_model_prefix}." if model_class.base_model_prefix != "" else ""
    with torch.device("meta"):
        skeleton = model_class(config)
    if getattr(skeleton, model_class.base_model_prefix, None) is None:
        prefix = ""
    excluded = host_table_names(config, prefix)
    if not excluded or device_map is None:
        return device_map
    for name in excluded:
        # Accelerate sizes the skeleton: make the excluded tables weigh nothing.
        table = skeleton.get_submodule(name)
        table.weight = nn.Parameter(torch.empty(0, table.embedding_dim, device="meta"), requires_grad=False)
    if isinstance(device_map, str) and device_map in _AUTO_DEVICE_MAPS:
        from transformers.integrations.accelerate import _get_device_map  # noqa: PLC0415 - only when asked

        device_map = _get_device_map(skeleton, device_map, max_memory, None)
    elif isinstance(device_map, (str, int, torch.device)):
        if isinstance(device_map, str) and device_map == "cuda":
            device_map = "cuda:0"
        device_map = {"": torch.device(device_map) if not isinstance(device_map, int) else device_map}
    device_map = dict(device_map)
    out: dict = {}
    for key, device in sorted(device_map.items(), key=lambda item: len(item[0])):
        module = skeleton.get_submodule(key) if key else skeleton
        if not isinstance(module, nn.Module):
            out[key] = device
            continue
        inner = [e for e in excluded if key == "" or e.startswith(key + ".") or e == key]
        if not inner:
            out[key] = device
        elif key not in inner:
            _map_around(module, f"{key}." if key else "", device, inner, out)
    return out


__all__ = [
    "PLACEMENTS",
    "EngramMemory",
    "EngramTable",
    "PinnedHostBuffer",
    "cuda_view_of_host",
    "engram_device_map",
    "host_table_names",
    "layer_placement",
    "pinned_host_copy",
    "prepare_engram_inputs",
    "resolve_memory",
]
