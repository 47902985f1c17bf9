"""Attribution: scores of neurons, layers and weights (causal effects for C-SWAP, more to come)."""
