"""headlab.kernels: pure tensor ops with plain-torch references (imports nothing else of headlab)."""
