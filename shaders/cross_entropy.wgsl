// shaders/cross_entropy.wgsl: to be written
