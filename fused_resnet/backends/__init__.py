"""Optional kernel backends. Each subpackage registers itself with ``fused_resnet._backend`` when
imported (lazily, on the first op call) and must import cleanly, or fail with a reason, on any
machine: a missing backend is never an error until it is asked for by name."""
