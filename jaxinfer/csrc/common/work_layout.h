// The columns of a plan's work rows and merge destinations (jaxinfer/plan/layout.py: WORK_FIELDS,
// MERGE_FIELDS), which the host planner (planner.cc) writes and the CUDA MLA kernel
// (mla/kernel.cuh) reads. Plain C++: g++ compiles the planner, nvcc the kernel.
#pragma once

namespace jaxinfer {

enum WorkField : int { kKvHead, kQRow0, kQLen, kQPos0, kKvLo, kKvHi, kKvBase, kOutSlot, kValid, kKvLen, kMaskBase,
                       kNumFields };
constexpr int kMergeFields = 4;  // MERGE_FIELDS: kv_head, q_row0, q_len, q_pos0

}  // namespace jaxinfer
