"""The t2t-mtl command line; heavy imports happen inside the verb that needs them."""
