// shaders/reduce.wgsl: to be written
