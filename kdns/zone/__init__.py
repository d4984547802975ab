"""The zone image: its layout, the compiler from RRsets to image bytes, and the pure
reference packet path over it. Knows no Kubernetes objects and no sockets."""
