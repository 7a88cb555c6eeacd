"""Code shared by the implementations of the sequence-parallel family: the layout of a sequence
over the ranks (`layout`), the timed and counted collectives (`comm`), moving a sequence dim
between whole and sharded (`sharding`), block attention with its log-sum-exp and the merge
(`blocks`), and the ring loops that run any implementation's block kernels (`ring`)."""
