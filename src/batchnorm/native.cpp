// The compiled autograd node of the "numba" backend for single-threaded inputs.
//
// At small sizes a training step spends most of its time around the kernels, not in them:
// the Python autograd Function, its Python backward, and the NumPy views of every tensor. This
// node records the graph and runs the backward in C++ and hands the kernels raw pointers. The
// kernels are the same Numba loops, compiled as C-callable entries
// (batchnorm/kernels/_entries.py) whose addresses Python registers once with set_kernels().
// The math lives there; this file only allocates, passes pointers and records the graph.
// Built on first use by batchnorm/native.py (torch.utils.cpp_extension).

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

// training forward (+ running update when nrun > 0); returns 1 when the running buffers were
// updated (0: no update requested, or the batch statistics were not finite)
using fwd_t = int32_t (*)(void* x, int64_t N, int64_t C, int64_t L, void* w, int64_t nw,
                          void* b, int64_t nb, double eps, void* y, void* mean, void* var,
                          void* invstd, void* rm, void* rv, int64_t nrun, void* nbt,
                          int64_t nnbt, double momentum, double alpha);
using bwd_t = void (*)(void* dy, void* x, int64_t N, int64_t C, int64_t L, void* mean,
                       void* invstd, void* w, int64_t nw, int32_t need_dx, void* dx, void* dw,
                       void* db);
using eval_t = void (*)(void* x, int64_t N, int64_t C, int64_t L, void* rm, void* rv, void* w,
                        int64_t nw, void* b, int64_t nb, double eps, void* y);

struct Entries {
  fwd_t fwd = nullptr;
  bwd_t bwd = nullptr;
  eval_t eval = nullptr;
};

Entries F32, F64;
// Python's differentiable backward (torch operations), for create_graph=True
py::object* GRAPH_BACKWARD = nullptr;

const Entries& entries(const Tensor& x) {
  return x.scalar_type() == at::kFloat ? F32 : F64;
}

void* ptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

int64_t len(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->numel() : 0;
}

Tensor or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

struct Dims {
  int64_t N, C, L;  // L == 0: rows x channels (N rows)
};

struct Node : public torch::autograd::Function<Node> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& w,
                        const std::optional<Tensor>& b,
                        const std::optional<Tensor>& rm, const std::optional<Tensor>& rv,
                        const std::optional<Tensor>& nbt, Dims d, double eps, double momentum,
                        double alpha, int64_t axis, Tensor* stats, bool* updated) {
    const Entries& e = entries(x);
    Tensor y = at::empty_like(x);  // x is dense: y gets its strides (channels_last stays)
    *stats = at::empty({3, d.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
    void* base = stats->data_ptr();
    const int64_t row = d.C * static_cast<int64_t>(x.element_size());
    char* s = static_cast<char*>(base);
    *updated = e.fwd(x.data_ptr(), d.N, d.C, d.L, ptr(w), len(w), ptr(b), len(b), eps,
                     y.data_ptr(), s, s + row, s + 2 * row, ptr(rm), ptr(rv),
                     rm.has_value() ? d.C : 0, ptr(nbt), len(nbt), momentum, alpha) != 0;
    ctx->save_for_backward({x, or_undefined(w), *stats});
    ctx->saved_data["N"] = d.N;
    ctx->saved_data["L"] = d.L;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["bias"] = b.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(13);
    Tensor dy = grads[0];
    if (!dy.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& w = saved[1];
    // needs_input_grad counts tensor inputs only: absent w or b shift the ones after them
    const bool has_w = w.defined();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = has_w && ctx->needs_input_grad(1);
    const bool need_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(has_w ? 2 : 1);
    if (at::GradMode::is_enabled()) {
      // a graph of the backward is wanted: Python recomputes it with torch operations
      py::gil_scoped_acquire gil;
      py::tuple r = (*GRAPH_BACKWARD)(dy, x, w.defined() ? py::cast(w) : py::none(),
                                      ctx->saved_data["eps"].toDouble(),
                                      ctx->saved_data["axis"].toInt());
      if (need_x) out[0] = r[0].cast<Tensor>();
      if (need_w && !r[1].is_none()) out[1] = r[1].cast<Tensor>();
      if (need_b && !r[2].is_none()) out[2] = r[2].cast<Tensor>();
      return out;
    }
    if (dy.strides() != x.strides() || dy.scalar_type() != x.scalar_type()) {
      dy = at::empty_like(x).copy_(dy);  // dy in x's layout: both walk one canonical view
    }
    const int64_t C = saved[2].size(1);
    char* st = static_cast<char*>(saved[2].data_ptr());  // rows: mean, var, invstd
    const int64_t row = C * static_cast<int64_t>(x.element_size());
    Tensor dx = need_x ? at::empty_like(x) : Tensor();
    Tensor g = at::empty({2, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
    char* gp = static_cast<char*>(g.data_ptr());
    entries(x).bwd(dy.data_ptr(), x.data_ptr(), ctx->saved_data["N"].toInt(), C,
                   ctx->saved_data["L"].toInt(), st, st + 2 * row,
                   w.defined() ? w.data_ptr() : nullptr, w.defined() ? w.numel() : 0,
                   need_x ? 1 : 0, need_x ? dx.data_ptr() : x.data_ptr(), gp,
                   gp + row);
    out[0] = dx;
    if (need_w) out[1] = g[0];
    if (need_b) out[2] = g[1];
    return out;
  }
};

// (y, stats (3, C): mean, biased var, invstd; updated)
std::tuple<Tensor, Tensor, bool> train(const Tensor& x, const std::optional<Tensor>& w,
                                       const std::optional<Tensor>& b,
                                       const std::optional<Tensor>& rm,
                                       const std::optional<Tensor>& rv,
                                       const std::optional<Tensor>& nbt, int64_t N, int64_t C,
                                       int64_t L, double eps, double momentum, double alpha,
                                       int64_t axis) {
  Tensor stats;
  bool updated = false;
  Tensor y = Node::apply(x, w, b, rm, rv, nbt, Dims{N, C, L}, eps,
                         momentum, alpha, axis, &stats, &updated);
  return {y, stats, updated};
}

Tensor evaluate(const Tensor& x, const Tensor& rm, const Tensor& rv,
                const std::optional<Tensor>& w, const std::optional<Tensor>& b, int64_t N,
                int64_t C, int64_t L, double eps) {
  Tensor y = at::empty_like(x);
  entries(x).eval(x.data_ptr(), N, C, L, rm.data_ptr(), rv.data_ptr(), ptr(w), len(w), ptr(b),
                  len(b), eps, y.data_ptr());
  return y;
}

void set_kernels(int64_t fwd32, int64_t bwd32, int64_t eval32, int64_t fwd64, int64_t bwd64,
                 int64_t eval64, py::object graph_backward) {
  F32 = {reinterpret_cast<fwd_t>(fwd32), reinterpret_cast<bwd_t>(bwd32),
         reinterpret_cast<eval_t>(eval32)};
  F64 = {reinterpret_cast<fwd_t>(fwd64), reinterpret_cast<bwd_t>(bwd64),
         reinterpret_cast<eval_t>(eval64)};
  delete GRAPH_BACKWARD;
  GRAPH_BACKWARD = new py::object(std::move(graph_backward));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_kernels", &set_kernels);
  m.def("train", &train);
  m.def("evaluate", &evaluate);
}
