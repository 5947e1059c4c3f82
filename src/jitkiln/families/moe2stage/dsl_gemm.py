"""CuTe DSL kernel of moe2stage's grouped GEMM (the ``*-dsl`` variants): imported only by the ``cutedsl``
compile worker (it needs ``nvidia-cutlass-dsl``); jitkiln's planning never imports it.

The problem is the one the CUTLASS ptr-array instances solve, without host synchronisation::

    D[rows, N] = A[rows, K] . B[e, N, K]^T    for the rows of each expert e: offsets[e] <= row < offsets[e+1]

A is the gathered activations sorted by expert (K contiguous), B the expert weights [E, N, K] (K contiguous),
D bf16 (N contiguous). ``offsets`` [E+1] comes from the routing on the device; ``tile_off`` [E+1] (written by
the unit's ``tile_offsets`` CUDA kernel) numbers each expert's M tiles, each expert's count padded to a
multiple of the cluster's M size, so the CTAs of one cluster always work on one expert (they share B's tile
through TMA multicast). Persistent: the grid is at most one CTA per SM (``NUM_SMS``, whole clusters; a bound
computed from the row and expert counts when smaller, no device value is read on the host); each cluster walks
the work units (cluster M group, N tile) up to ``tile_off[E] / cluster_m * n_tiles`` with a stride of the
cluster count, finding each M tile's expert by binary search in ``tile_off``.

Warp-specialised: one producer warp (after the consumer warpgroups) issues the TMA loads (A at the expert's row
offset, B's tile at coordinate ``e`` of its expert mode, B multicast across the cluster's M) into a multi-stage
mbarrier pipeline, running ahead into the next tile; the consumers run wgmma with fp32 accumulators. 128-row
tiles: two consumer warpgroups, 64 rows each of one tile ("cooperative"), or for the pingpong schedule (tile_n
<= 128) each its own tile, alternating over the CTA's units, main loops ordered by named barriers so that one's
epilogue overlaps the other's MMAs. Epilogue: the bf16 tile is staged in its own shared-memory buffer, 64 rows
at a time, then stored in 16-byte rows predicated on the expert's last row (a tile may end inside the next
expert: TMA loads its rows, nothing of them is stored; a TMA store could not stop there).

Parameters (from the instance): tile_m, tile_n, tile_k, cluster_m, cluster_n, schedule; ``compile_for`` builds the
fake tensors and calls ``cute.compile``. Written for nvidia-cutlass-dsl 4.8.x (the worker checks the version).
"""
from __future__ import annotations

import math

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait

MAX_EXPERTS_LOG2 = 17  # binary search depth: up to 2^17 - 1 local experts (the units refuse more)
NUM_SMS = 132  # H100 SXM / H200: persistent grid size (fewer SMs: still correct, one more partial wave)


class MoEGroupedGemm:
    def __init__(self, tile_m: int, tile_n: int, tile_k: int, cluster_m: int, cluster_n: int,
                 schedule: str = "cooperative", occupancy: int = 1, consumers: int = 1):
        if tile_m not in (64, 128):
            raise ValueError(f"tile_m must be 64 or 128, got {tile_m}")
        if tile_n not in (64, 128, 256):
            raise ValueError(f"tile_n must be 64, 128 or 256, got {tile_n}")
        if cluster_n != 1:
            raise ValueError("the DSL grouped GEMM multicasts B across the cluster's M only: cluster_n must be 1")
        if occupancy not in (1, 2):
            raise ValueError(f"occupancy (CTAs per SM) must be 1 or 2, got {occupancy}")
        if consumers not in (1, 2) or (consumers == 2 and (tile_m != 64 or schedule != "pingpong")):
            raise ValueError(f"consumers must be 1, or 2 for a 64-row ping-pong tile, got {consumers}")
        # CTAs resident per SM: 2 splits shared memory (fewer stages each) so that one CTA's tile switch and
        # epilogue overlap the other's loads; the persistent grid then holds 2 CTAs per SM
        self.occupancy = occupancy
        self.acc_dtype = cutlass.Float32
        self.tile_k_req = tile_k
        self.cluster_shape_mn = (cluster_m, cluster_n)
        self.tile_shape_mnk = (tile_m, tile_n, tile_k)
        # 128-row tiles: two consumer warpgroups, either 64 rows each of one tile ("cooperative") or each its own
        # tile, taking turns in the main loop so that one's epilogue overlaps the other's MMAs ("pingpong"); 64-row
        # tiles: one consumer warpgroup, or (consumers=2) two taking turns the same way
        self.pingpong = schedule == "pingpong" and ((tile_m > 64 and tile_n <= 128) or consumers == 2)
        self.atom_layout_mnk = (2, 1, 1) if tile_m > 64 and not self.pingpong else (1, 1, 1)
        self.mma_warp_groups = math.prod(self.atom_layout_mnk)
        self.consumer_wgs = 2 if self.pingpong else self.mma_warp_groups
        self.mma_threads = 128 * self.consumer_wgs
        self.producer_warp = self.mma_threads // 32  # one warp after the consumer warpgroups issues the TMA loads
        self.threads_per_cta = self.mma_threads + 32
        self.smem_capacity = utils.get_smem_capacity_in_bytes("sm_90")
        self.buffer_align_bytes = 1024

    # --- host side (traced once per compile) ---------------------------------------------------------
    def _setup(self):
        self.tiled_mma = sm90_utils.make_trivial_tiled_mma(
            self.a_dtype, self.b_dtype, self.a_layout.sm90_mma_major_mode(), self.b_layout.sm90_mma_major_mode(),
            self.acc_dtype, self.atom_layout_mnk, tiler_mn=(64, self.tile_shape_mnk[1]))
        inst_k = cute.size(self.tiled_mma.shape_mnk, mode=[2])
        tk = self.tile_k_req if self.tile_k_req % inst_k == 0 else inst_k * 4
        self.tile_shape_mnk = (self.tile_shape_mnk[0], self.tile_shape_mnk[1], tk)
        self.cta_layout_mnk = cute.make_layout((*self.cluster_shape_mn, 1))
        self.num_mcast_b = self.cluster_shape_mn[0]
        # epilogue tile: 64 rows (one consumer warpgroup's accumulators at a time), rows padded by 8 elements
        # (bank-conflict free accumulator writes, 16-byte aligned rows); its own buffer, since the producer warp
        # already loads the next tile's stages while the consumers store this one
        self.d_pad = 8
        # (pingpong: one 64-row buffer per warpgroup)
        self.d_cosize = (64 * (2 if self.pingpong else 1) - 1) * (self.tile_shape_mnk[1] + self.d_pad) \
            + self.tile_shape_mnk[1]
        d_bytes = self.d_cosize * self.a_dtype.width // 8
        ab_bytes = (self.tile_shape_mnk[0] + self.tile_shape_mnk[1]) * tk * self.a_dtype.width // 8
        # per CTA; 2 CTAs: the second's reserved 1 KB too (1 CTA: the whole capacity, as before the option)
        budget = self.smem_capacity // self.occupancy - 1024 * (self.occupancy - 1)
        self.ab_stage = min(8, (budget - d_bytes - 1024) // ab_bytes)
        if self.ab_stage < 2:
            raise ValueError(f"tile {self.tile_shape_mnk} at occupancy {self.occupancy}: fewer than 2 stages fit")
        self.a_smem_staged = sm90_utils.make_smem_layout_a(self.a_layout, self.tile_shape_mnk, self.a_dtype,
                                                           self.ab_stage)
        self.b_smem_staged = sm90_utils.make_smem_layout_b(self.b_layout, self.tile_shape_mnk, self.b_dtype,
                                                           self.ab_stage)

    @cute.jit
    def __call__(self, a: cute.Tensor, b: cute.Tensor, d: cute.Tensor, offsets: cute.Tensor,
                 tile_off: cute.Tensor, stream: cuda.CUstream):
        self.a_dtype = a.element_type
        self.b_dtype = b.element_type
        self.d_dtype = d.element_type
        self.a_layout = utils.LayoutEnum.from_tensor(a)
        self.b_layout = utils.LayoutEnum.from_tensor(b)
        self._setup()
        tm, tn, tk = self.tile_shape_mnk
        op_a = cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_a, tma_a = cute.nvgpu.cpasync.make_tiled_tma_atom(
            op_a, a, cute.slice_(self.a_smem_staged, (None, None, 0)), (tm, tk), num_multicast=1)
        op_b = (cute.nvgpu.cpasync.CopyBulkTensorTileG2SMulticastOp() if self.num_mcast_b > 1
                else cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp())
        tma_atom_b, tma_b = cute.nvgpu.cpasync.make_tiled_tma_atom(
            op_b, b, cute.slice_(self.b_smem_staged, (None, None, 0)), (tn, tk), num_multicast=self.num_mcast_b)

        rows = cute.size(a, mode=[0])
        n = cute.size(d, mode=[1])
        experts = cute.size(b, mode=[2])
        cm = self.cluster_shape_mn[0]
        # bound on sum_e cm * ceil(ceil(M_e / tm) / cm): rows / tm + (cm) per non-empty expert
        slots = (rows + tm - 1) // tm + cutlass.min(experts, rows) * cm
        slots = (slots + cm - 1) // cm * cm
        n_tiles = (n + tn - 1) // tn
        # persistent: at most one cluster per SM group, each walking work units (cluster M group, N tile)
        clusters = cutlass.min(slots // cm * n_tiles, NUM_SMS * self.occupancy // cm)

        @cute.struct
        class SharedStorage:
            pipe: cute.struct.MemRange[cutlass.Int64, self.ab_stage * 2]
            sA: cute.struct.Align[cute.struct.MemRange[self.a_dtype, cute.cosize(self.a_smem_staged)],
                                  self.buffer_align_bytes]
            sB: cute.struct.Align[cute.struct.MemRange[self.b_dtype, cute.cosize(self.b_smem_staged)],
                                  self.buffer_align_bytes]
            sD: cute.struct.Align[cute.struct.MemRange[self.d_dtype, self.d_cosize], 128]

        self.shared_storage = SharedStorage
        self.kernel(tma_atom_a, tma_a, tma_atom_b, tma_b, d, offsets, tile_off, self.tiled_mma,
                    self.cta_layout_mnk, self.a_smem_staged, self.b_smem_staged, n_tiles).launch(
            grid=(clusters * cm, 1, 1), block=[self.threads_per_cta, 1, 1],
            cluster=(*self.cluster_shape_mn, 1), stream=stream)

    # --- device side --------------------------------------------------------------------------------
    @cute.kernel
    def kernel(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
               mD: cute.Tensor, offsets: cute.Tensor, tile_off: cute.Tensor, tiled_mma: cute.TiledMma,
               cta_layout_mnk: cute.Layout, a_smem_staged: cute.ComposedLayout,
               b_smem_staged: cute.ComposedLayout, n_tiles: cutlass.Int32):
        tm, tn, tk = self.tile_shape_mnk
        cm = self.cluster_shape_mn[0]
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        experts = cute.size(offsets, mode=[0]) - 1
        units = tile_off[experts] // cm * n_tiles
        if warp_idx == self.producer_warp:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_a)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_b)

        cta_rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        cluster_coord = cta_layout_mnk.get_flat_coord(cta_rank)
        b_mcast_mask = cute.make_layout_image_mask(cta_layout_mnk, cluster_coord, mode=0)
        b_mcast_mask = b_mcast_mask if self.num_mcast_b > 1 else 0

        a_smem = cute.slice_(a_smem_staged, (None, None, 0))
        b_smem = cute.slice_(b_smem_staged, (None, None, 0))
        tx_bytes = cute.size_in_bytes(self.a_dtype, a_smem) + cute.size_in_bytes(self.b_dtype, b_smem)
        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        producer = pipeline.CooperativeGroup(pipeline.Agent.Thread)
        # a stage is read by every consumer warp (pingpong: by the warps of one warpgroup) of each CTA it reaches
        consumer = pipeline.CooperativeGroup(pipeline.Agent.Thread,
                                             self.num_mcast_b * (self.mma_threads // 32 // (2 if self.pingpong else 1)))
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.pipe.data_ptr(), num_stages=self.ab_stage, producer_group=producer,
            consumer_group=consumer, tx_count=tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, *cta_layout_mnk.shape)), defer_sync=True)
        pipeline_init_arrive(cluster_shape_mn=self.cluster_shape_mn, is_relaxed=True)
        sA = storage.sA.get_tensor(a_smem_staged.outer, swizzle=a_smem_staged.inner)
        sB = storage.sB.get_tensor(b_smem_staged.outer, swizzle=b_smem_staged.inner)
        # the epilogue buffer holds 64 rows; the (tm, tn) view maps warpgroup h's rows 64h.. onto it (stride 0)
        wg = cute.arch.make_warp_uniform(tidx // 128)
        # pingpong: warpgroup wg's own 64-row buffer; the (tm, tn) view maps rows 64h.. onto it (stride 0)
        sD = storage.sD.get_tensor(cute.make_layout((64, tn, self.consumer_wgs if self.pingpong else 1),
                                                    stride=(tn + self.d_pad, 1, 64 * (tn + self.d_pad))))
        sD = sD[(None, None, wg % self.consumer_wgs if self.pingpong else 0)]
        sDv = cute.make_tensor(sD.iterator, cute.make_layout(((64, tm // 64), tn), stride=((tn + self.d_pad, 0), 1)))

        thr_mma = tiled_mma.get_slice(cute.make_layout(self.mma_warp_groups, stride=128)(wg % self.mma_warp_groups))
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        # C partitioned by the thread (the warpgroup slice above is right for A/B's descriptors only)
        epi_threads = 128 if self.pingpong else self.mma_threads
        thr_mma_c = tiled_mma.get_slice(tidx % epi_threads)
        tCsD = thr_mma_c.partition_C(sDv)
        acc = cute.make_rmem_tensor(tCsD.shape, self.acc_dtype)
        cpr = tn // 8
        copy_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.d_dtype, num_bits_per_copy=128)
        tiled_copy = cute.make_tiled_copy_tv(
            copy_atom, cute.make_layout((epi_threads // cpr, cpr), stride=(cpr, 1)), cute.make_layout((1, 8)))
        thr_copy = tiled_copy.get_slice(tidx % epi_threads)
        tDsD = thr_copy.partition_S(sD)
        tDcD = thr_copy.partition_D(cute.make_identity_tensor((64, tn)))
        pipeline_init_wait(cluster_shape_mn=self.cluster_shape_mn)

        k_tiles = (cute.size(mA, mode=[1]) + tk - 1) // tk
        num_k_blocks = cute.size(tCrA, mode=[2])
        prod = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.ab_stage)
        read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)
        release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.ab_stage)
        # work unit u: cluster M group u // n_tiles (this CTA: its M tile cm * group + rank), N tile u % n_tiles
        for u in cutlass.range(bidx // cm, units, gdim // cm, unroll=1):
            pid_m = (u // n_tiles) * cm + cluster_coord[0]
            pid_n = u % n_tiles
            # the expert of this M tile: the largest e with tile_off[e] <= pid_m
            lo = cutlass.Int32(0)
            hi = cutlass.Int32(experts)
            for _ in cutlass.range_constexpr(MAX_EXPERTS_LOG2):
                mid = (lo + hi + 1) // 2
                if tile_off[mid] <= pid_m:
                    lo = mid
                else:
                    hi = mid - 1
            e = lo
            m_start = offsets[e] + (pid_m - tile_off[e]) * tm
            m_rem = offsets[e + 1] - m_start  # rows of this tile that belong to expert e (<= 0: padding CTA)
            if warp_idx == self.producer_warp:
                # A: the expert's rows from m_start (TMA zero-fills past the last row); B: expert e's (N, K) slab
                # ((tn, tk) tiler with the integer expert coordinate: the expert mode is dropped)
                gA = cute.local_tile(cute.domain_offset((m_start, 0), mA), (tm, tk), (0, None))
                gB = cute.local_tile(mB, (tn, tk), (pid_n, None, e))
                tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
                tBsB, tBgB = cute.nvgpu.cpasync.tma_partition(
                    tma_atom_b, cluster_coord[0], cute.make_layout(cm),
                    cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
                for k_tile in cutlass.range(k_tiles, unroll=1):
                    mainloop.producer_acquire(prod)
                    bar = mainloop.producer_get_barrier(prod)
                    cute.copy(tma_atom_a, tAgA[(None, k_tile)], tAsA[(None, prod.index)], tma_bar_ptr=bar)
                    cute.copy(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, prod.index)], tma_bar_ptr=bar,
                              mcast_mask=b_mcast_mask)
                    mainloop.producer_commit(prod)
                    prod.advance()
            if warp_idx < self.producer_warp:
                # pingpong: unit i of this CTA (the i-th of its list) belongs to warpgroup i % 2; a warpgroup enters
                # its main loop once the other one has waited for every stage of its previous tile (named barrier
                # 2 + wg), so no consumer ever waits more than one phase ahead of a stage's barrier
                nwg = 2 if self.pingpong else 1
                i = (u - bidx // cm) // (gdim // cm)
                n_local = (units - bidx // cm + gdim // cm - 1) // (gdim // cm)
                if i % nwg == wg % nwg:
                    if cutlass.const_expr(self.pingpong):
                        if i > 0:
                            cute.arch.barrier(barrier_id=2 + wg, number_of_threads=self.mma_threads)
                    tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, False)
                    for k_tile in cutlass.range(k_tiles, unroll=1):
                        mainloop.consumer_wait(read)
                        cute.nvgpu.warpgroup.fence()
                        for kb in cutlass.range(num_k_blocks, unroll_full=True):
                            cute.gemm(tiled_mma, acc, tCrA[(None, None, kb, read.index)],
                                      tCrB[(None, None, kb, read.index)], acc)
                            tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                        cute.nvgpu.warpgroup.commit_group()
                        # keep one wgmma batch in flight: the stage read one step ago is free once it has retired
                        cute.nvgpu.warpgroup.wait_group(1)
                        read.advance()
                        if k_tile > 0:
                            mainloop.consumer_release(release)
                            release.advance()
                    if cutlass.const_expr(self.pingpong):
                        # every stage of this tile has arrived: the other warpgroup may start its main loop
                        if i + 1 < n_local:
                            cute.arch.barrier_arrive(barrier_id=3 - wg, number_of_threads=self.mma_threads)
                    cute.nvgpu.warpgroup.wait_group(0)
                    if k_tiles > 0:
                        mainloop.consumer_release(release)
                        release.advance()

                    # epilogue: bf16 through shared memory, 64 rows at a time (cooperative: warpgroup h's rows;
                    # pingpong: the warpgroup's M repeat h, in its own buffer), then 16-byte row stores predicated
                    # on the expert's last row and on N. A TMA store cannot stop at the expert's last row (a tile
                    # may end inside the next expert, whose CTA writes those rows).
                    n_rem = cute.size(mD, mode=[1]) - pid_n * tn
                    for h in cutlass.range_constexpr(tm // 64):
                        cute.arch.barrier(barrier_id=4 + wg if self.pingpong else 1, number_of_threads=epi_threads)
                        if cutlass.const_expr(self.pingpong):
                            tCsD[(None, h, None)].store(acc[(None, h, None)].load().to(self.d_dtype))
                        else:
                            if wg == h:
                                tCsD.store(acc.load().to(self.d_dtype))
                        cute.arch.barrier(barrier_id=4 + wg if self.pingpong else 1, number_of_threads=epi_threads)
                        gD = cute.local_tile(cute.domain_offset((m_start + h * 64, 0), mD), (64, tn), (0, pid_n))
                        tDgD = thr_copy.partition_D(gD)
                        for ci in cutlass.range_constexpr(cute.size(tDgD, mode=[1])):
                            for cj in cutlass.range_constexpr(cute.size(tDgD, mode=[2])):
                                crd = tDcD[(0, ci, cj)]
                                if crd[0] + h * 64 < m_rem:
                                    if crd[1] < n_rem:
                                        cute.copy(copy_atom, tDsD[(None, ci, cj)], tDgD[(None, ci, cj)])
                else:
                    # the other warpgroup's tile: skip its stages
                    for _k in cutlass.range(k_tiles, unroll=1):
                        read.advance()
                        release.advance()
        if warp_idx == self.producer_warp:
            # every stage's release seen (peers' arrives included) before this CTA may exit
            mainloop.producer_tail(prod)
        # no CTA of the cluster may exit while a peer can still multicast into its shared memory
        if cutlass.const_expr(cute.size(self.cluster_shape_mn) > 1):
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()


def compile_for(params: dict):
    """``cute.compile`` of the grouped GEMM for one instance (``params``: dtype, tile_*, cluster_*), on fake
    tensors with dynamic rows, N, K and expert count. Returns the compiled callable (``export_to_c`` ready)."""
    from cutlass.cute.runtime import make_fake_compact_tensor

    dtype = params["dtype"]
    if dtype != "bf16":
        raise ValueError(f"the DSL grouped GEMM supports dtype bf16 only so far, not {dtype!r}")
    el = cutlass.BFloat16
    rows, n, k, e = cute.sym_int32(), cute.sym_int32(divisibility=8), cute.sym_int32(divisibility=8), cute.sym_int32()
    a = make_fake_compact_tensor(el, (rows, k), stride_order=(1, 0), assumed_align=16)
    b = make_fake_compact_tensor(el, (n, k, e), stride_order=(1, 0, 2), assumed_align=16)
    d = make_fake_compact_tensor(el, (rows, n), stride_order=(1, 0), assumed_align=16)
    off = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int32(),), assumed_align=4)
    toff = make_fake_compact_tensor(cutlass.Int32, (cute.sym_int32(),), assumed_align=4)
    g = MoEGroupedGemm(params["tile_m"], params["tile_n"], params["tile_k"], params["cluster_m"],
                       params["cluster_n"], params.get("schedule", "cooperative"), params.get("occupancy", 1),
                       params.get("consumers", 1))
    return cute.compile(g, a, b, d, off, toff, cuda.CUstream(0))
