"""Target codecs of the store: how the top-k targets are laid out in Zarr arrays (fp16 is the
plain layout of softlabels.stores.format; ``compact`` is format 1.2's quantised one)."""
