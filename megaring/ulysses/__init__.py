"""Head-parallel context parallelism (DeepSpeed-Ulysses) and the 2D hybrid with the ring:
``comm`` (the all-to-all), ``heads`` (which heads each rank gets: pure arithmetic, imported by the
model config), ``attention`` (``context_attention``, public as ``megaring.context_attention``).
Nothing is imported here, so the config checks do not pull in the ring."""
