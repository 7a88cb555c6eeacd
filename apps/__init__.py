"""Applications built on clusterfx (above the compiler): THC for brain networks."""
