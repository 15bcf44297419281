// shaders/rope.wgsl: to be written
