// shaders/matmul.wgsl: to be written
