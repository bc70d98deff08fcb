/*
 * One V8 call that Node-API lacks: an ArrayBuffer over memory the shim maps (guest RAM, device
 * memory, views of another thread's mapping) whose backing store has V8's empty deleter.
 *
 * Why: an ArrayBuffer made by napi_create_external_arraybuffer carries a deleter (Node's
 * finalizer hook), so V8 counts its whole length as external memory that a GC could free. Guest
 * RAM is hundreds of MiB that no GC can free (the shim unmaps it), and counting it made every
 * VM's build start a mark-compact on its thread (V8 starts one when external memory grows by
 * 64 MiB since the last), 3-7 ms per VM start. A backing store with the empty deleter is not
 * counted (V8's BackingStore::PerIsolateAccountingLength). The buffer still detaches as any
 * other, which is how munmap and release retire it.
 *
 * The napi_value returned is the v8::Local itself: Node-API's values are V8 locals (Node's
 * v8impl::JsValueFromV8LocalValue is the same reinterpretation), made in the HandleScope Node
 * opens around every native call.
 */
#include <node_api.h>
#include <v8.h>

#include <cstring>
#include <memory>

static_assert(sizeof(v8::Local<v8::Value>) == sizeof(napi_value), "napi_value is a v8::Local");

extern "C" napi_value tv_uncounted_arraybuffer(void *data, size_t length) {
  v8::Isolate *isolate = v8::Isolate::GetCurrent();
  if (isolate == nullptr) return nullptr;
  std::unique_ptr<v8::BackingStore> store =
      v8::ArrayBuffer::NewBackingStore(data, length, v8::BackingStore::EmptyDeleter, nullptr);
  v8::Local<v8::Value> ab = v8::ArrayBuffer::New(isolate, std::move(store));
  napi_value out;
  std::memcpy(&out, &ab, sizeof out);
  return out;
}
