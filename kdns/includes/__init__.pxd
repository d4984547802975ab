# Makes kdns.includes a package for cimport; the declarations live in system.pxd.
