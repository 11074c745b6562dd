// A C surface over PyTorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo and, where built,
// ProcessGroupNCCL) for the Rust side. Every entry point catches every C++ exception and hands
// its message back as a malloc'd string: an exception must never unwind into Rust.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SOFTALIGN_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

char* dup_message(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = dup_message(e.what());
  } catch (...) {
    *err = dup_message("unknown C++ exception");
  }
  return 1;
}

// Gloo binds to the interfaces GLOO_SOCKET_IFNAME names (comma-separated), as Python's
// init_process_group does; otherwise to the address this host's name resolves to.
c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> gloo_options(std::chrono::milliseconds timeout) {
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname == nullptr || *ifname == '\0') {
    return c10d::ProcessGroupGloo::Options::create_default(timeout);
  }
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  std::stringstream names(ifname);
  std::string name;
  while (std::getline(names, name, ',')) {
    if (!name.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
    }
  }
  return opts;
}

void wait_all(const std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  // Wait for every one even after a failure, so no collective is left in flight.
  std::exception_ptr first;
  for (const auto& w : works) {
    try {
      w->wait();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace

extern "C" {

void sa_free_message(char* m) { std::free(m); }

int sa_nccl_built() {
#ifdef SOFTALIGN_NCCL
  return 1;
#else
  return 0;
#endif
}

// backend: 0 gloo, 1 nccl. serve_store: this process hosts the TCPStore (rank 0, unless
// torchrun's agent already serves it).
int sa_group_new(int backend, const char* host, int port, int rank, int world, int serve_store,
                 long long timeout_ms, void** out, char** err) {
  return guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = serve_store != 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    auto g = std::make_unique<Group>();
    g->store = tcp;
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("default_pg", tcp);
    if (backend == 0) {
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, gloo_options(timeout));
    } else {
#ifdef SOFTALIGN_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world, opts);
#else
      throw std::runtime_error("this softalign was built without NCCL (its headers were not found at build time); use the gloo backend");
#endif
    }
    *out = g.release();
  });
}

void sa_group_free(void* g) { delete static_cast<Group*>(g); }

// Sum-all-reduces `n` tensors in place, each its own asynchronous collective, then waits for all.
int sa_allreduce_sum(void* g, at::Tensor** tensors, int n, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*tensors[i]};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      works.push_back(grp->backend->allreduce(one, o));
    }
    wait_all(works);
  });
}

int sa_broadcast(void* g, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    std::vector<at::Tensor> one{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    grp->backend->broadcast(one, o)->wait();
  });
}

// Gathers `input` from every rank into `outputs[0..world]` (same shape and dtype as `input`).
int sa_allgather(void* g, at::Tensor* input, at::Tensor** outputs, int world, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    std::vector<at::Tensor> in{*input};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int i = 0; i < world; ++i) out[0].push_back(*outputs[i]);
    grp->backend->allgather(out, in)->wait();
  });
}

int sa_barrier(void* g, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    grp->backend->barrier()->wait();
  });
}

// Store access for the liveness roll call after a failure.
int sa_store_set(void* g, const char* key, const char* value, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    std::string v(value);
    grp->store->set(std::string(key), std::vector<uint8_t>(v.begin(), v.end()));
  });
}

int sa_store_check(void* g, const char* key, int* present, char** err) {
  return guarded(err, [&] {
    auto* grp = static_cast<Group*>(g);
    *present = grp->store->check({std::string(key)}) ? 1 : 0;
  });
}

}  // extern "C"
