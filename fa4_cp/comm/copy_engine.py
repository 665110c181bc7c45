"""Copy-engine transport for the GPUs of one node: KV goes straight into the peer's receive buffer
by a device-to-device copy on the comm stream (copy engines over NVLink, 0 SMs).

Receive buffers live in torch symmetric memory, so every rank can address every peer's. A hop
from rank s to rank d on a channel is two-way signalled with per-pair counters in a symmetric flag
array, all as stream memory operations:
  1. d stores FREE (its receive buffer is no longer read) into s's flags;
  2. s waits for d's FREE, copies its send buffers (a hop's pieces; a piece of pitched rows by
     one 2-D copy, landing contiguous) into d's receive buffers, then stores DATA (the store is
     fenced behind the copies) into d's flags;
  3. d waits for s's DATA before anything later on its comm stream, and so before its compute
     stream reads the buffer.
So a receiver never reads a buffer whose write is unfinished, and a sender never overwrites a
buffer its receiver is still reading. Every rank runs the same sequence of hops (same schedule,
same slots), which keeps both ends' counters in step and the slot offsets equal.
Multicast is never used (TORCH_SYMM_MEM_DISABLE_MULTICAST defaults to 1 here).
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import stream_memops
from .buffers import BufferPool
from .pitched import pitched_rows
from .transport import Done, copied_to_self
from .watchdog import HopWatchdog

CHANNELS = 3  # KV, dK/dV, the Ulysses all-to-all
FREE, DATA = 0, 1


def _symmetric(nbytes: int, device: torch.device, group: dist.ProcessGroup):
    import torch.distributed._symmetric_memory as symm_mem

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    tensor = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    return tensor, symm_mem.rendezvous(tensor, group.group_name)


class CopyEngineTransport:
    stream_ordered = True
    copies_into_peers = True

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout: float):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.watchdog = HopWatchdog(self.rank, self.world_size, timeout)
        flags_bytes = 4 * 2 * CHANNELS * self.world_size
        self._flags, self._flags_handle = _symmetric(flags_bytes, device, group)
        self._flags.zero_()
        torch.cuda.synchronize(device)
        dist.barrier(group, device_ids=[device.index])
        # Host-side counts per (kind, channel, peer): signals stored, and signals awaited.
        self._stored: collections.Counter = collections.Counter()
        self._awaited: collections.Counter = collections.Counter()
        self._flag_ptrs = list(self._flags_handle.buffer_ptrs)
        self._arenas: dict[int, tuple[object, list[int]]] = {}  # arena address -> (handle, every rank's address)
        self._pool = BufferPool(self._allocate)

    def _allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        # Collective: every rank grows at the same call. Queued hops into the old arena finish first.
        torch.cuda.synchronize(device)
        dist.barrier(self.group, device_ids=[device.index])
        arena, handle = _symmetric(nbytes, device, self.group)
        self._arenas[arena.data_ptr()] = (handle, list(handle.buffer_ptrs))
        return arena

    def buffers(self, channel: int, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        slots = self._pool.slots(channel, count, shape, dtype, device)
        if len(self._arenas) > CHANNELS:  # an arena grew: let the replaced one go
            current = {self._pool.arena(c).data_ptr() for c in range(CHANNELS) if self._pool.has(c)}
            self._arenas = {ptr: entry for ptr, entry in self._arenas.items() if ptr in current}
        return slots

    def _flag_address(self, owner: int, kind: int, channel: int, peer: int) -> int:
        index = (kind * CHANNELS + channel) * self.world_size + peer
        return self._flag_ptrs[owner] + 4 * index

    def _signal(self, stream: torch.cuda.Stream, kind: int, channel: int, peer: int) -> None:
        """Store my next `kind` count for this channel into `peer`'s flags."""
        key = (kind, channel, peer)
        self._stored[key] += 1
        stream_memops.write_value(stream, self._flag_address(peer, kind, channel, self.rank), self._stored[key])

    def _await(self, stream: torch.cuda.Stream, kind: int, channel: int, peer: int) -> None:
        key = (kind, channel, peer)
        self._awaited[key] += 1
        stream_memops.wait_value(stream, self._flag_address(self.rank, kind, channel, peer), self._awaited[key])

    def shift(
        self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], offset: int, channel: int = 0,
        lands_at: Sequence[torch.Tensor | None] | None = None,
    ) -> Done:
        stream = torch.cuda.current_stream(self.device)
        if offset % self.world_size == 0:
            return copied_to_self(sends, recvs)
        dst = (self.rank + offset) % self.world_size
        src = (self.rank - offset) % self.world_size
        arena = self._pool.arena(channel)
        places = [None] * len(recvs) if lands_at is None else lands_at
        copies = []
        for send, recv, place in zip(sends, recvs, places, strict=True):
            # The peer's receive buffer sits where mine (or `lands_at`) does in my arena: every
            # rank's slots have one layout.
            where = _arena_offset(recv if place is None else place, arena)
            rows = pitched_rows(send)
            if not ((rows or not send.numel()) and recv.is_contiguous() and 0 <= where < arena.numel()):
                raise ValueError("copy-engine shift: recvs (and lands_at) must be contiguous views of buffers(); sends contiguous or pitched rows")
            if rows:
                copies.append((where, send, rows))
        receives = any(recv.numel() for recv in recvs)
        # One handshake for all the pieces: a piece's peer receives it exactly when it sends it
        if receives:
            self._signal(stream, FREE, channel, src)
        if copies:
            self._await(stream, FREE, channel, dst)
            peer_arena = self._arenas[arena.data_ptr()][1][dst]
            for where, send, rows in copies:
                if rows.height == 1:
                    stream_memops.copy(stream, peer_arena + where, send.data_ptr(), rows.width)
                else:  # lands as its contiguous bytes
                    stream_memops.copy_2d(stream, peer_arena + where, rows.width, send.data_ptr(), rows.pitch, rows.width, rows.height)
            self._signal(stream, DATA, channel, dst)
        if receives:
            self._await(stream, DATA, channel, src)
        return Done()


def _arena_offset(view: torch.Tensor, arena: torch.Tensor) -> int:
    """Byte offset of `view` in `arena`, from its storage (an empty view's data_ptr() is 0)."""
    return view.untyped_storage().data_ptr() + view.storage_offset() * view.element_size() - arena.data_ptr()


def node_has_peer_access(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Collective: every rank of `group` is on this host and can map every other rank's GPU."""
    world_size = dist.get_world_size(group)
    mine = (socket.gethostname(), device.index, stream_memops.available())
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, mine, group=group)
    same_host = all(host == mine[0] and memops for host, _, memops in everyone)
    peers = {index for _, index, _ in everyone} - {device.index}
    can_map = same_host and all(torch.cuda.can_device_access_peer(device.index, peer) for peer in peers)
    verdicts: list = [None] * world_size
    dist.all_gather_object(verdicts, can_map, group=group)
    return all(verdicts)
