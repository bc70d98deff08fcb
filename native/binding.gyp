{
  "targets": [
    {
      "target_name": "typervisor_native",
      "sources": ["typervisor.c"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-O2", "-fno-strict-aliasing"]
    }
  ]
}
