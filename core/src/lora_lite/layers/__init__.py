"""Layer kinds: what a targetable layer is, its dense (d_out, d_in) weight read and
written back (requantizing), bitsandbytes, nn.MultiheadAttention."""
