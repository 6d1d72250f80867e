"""bento-lmm: the pure pieces of the serving path (config, protocol, pre/post-processing, engines)."""
