"""What users call: `compile`, `transform`, `explain`/`Report`, the dynamo backend, the ordered
pass manager built from the compile state (policy, mesh), and `check_equivalence`."""
