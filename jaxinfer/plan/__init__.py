"""The plan stage, on the host: batch spec and capacities (:mod:`.batch`), host-side checks of page
tables and row pointers (:mod:`.checks`), the load-balanced planner (:mod:`.planner`, compiled from
``jaxinfer/csrc/planner.cc`` by :mod:`.native`), the work-buffer layout the kernels read
(:mod:`.layout`) and the host-to-device copy of the buffers (:mod:`.transfer`)."""
