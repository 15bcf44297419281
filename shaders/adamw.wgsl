// shaders/adamw.wgsl: to be written
