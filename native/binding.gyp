{
  "targets": [
    {
      "target_name": "typervisor_native",
      "sources": ["typervisor.c", "uncounted.cc"],
      "cflags": ["-Wall", "-Wextra", "-O2", "-fno-strict-aliasing"],
      "cflags_c": ["-std=gnu11"],
      "cflags_cc": ["-std=gnu++17", "-fno-exceptions"]
    }
  ]
}
