// shaders/softmax.wgsl: to be written
