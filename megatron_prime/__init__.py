"""megatron_prime: PRIME on Megatron-core."""

import warnings

# Megatron-core announces at import time that it falls back to its own kernels when
# Transformer Engine / apex are absent: expected on CPU, and noise in every CLI's output.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed.*")
# megatron-core 0.16 warns about its own default cuda_graph_scope on every TransformerConfig.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
