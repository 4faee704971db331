// The compiled autograd node of the "numba" backend.
//
// Around the kernels, a layer call costs Python work: the autograd Function and its Python
// backward, the NumPy views of every tensor, the checks and the canonical view. At (60, 100)
// that is most of a training step; on large inputs it is 100-200 us when the caches are cold
// after a large pass. This node takes the input as it comes, checks it, records the graph and
// runs the backward in C++ (also of inference recorded with gradients), and hands the kernels
// raw pointers. The kernels are the same Numba loops, compiled as C-callable entries
// (batchnorm/kernels/_entries.py), each resolved through Python the first time a call needs
// it (set_kernels() registers the resolver); the caller passes the thread count, saved here
// for the backward. The math lives there; this file only
// checks, allocates, passes pointers and records the graph. Built on first use by
// batchnorm/native.py (torch.utils.cpp_extension).
//
// Half-precision inputs (the "aten" backend) take the same entry points to torch's own
// operator, with the running update here (see train_half).

#include <torch/extension.h>

#include <c10/core/CPUAllocator.h>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef __unix__
#include <pthread.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <mutex>
#include <new>
#include <vector>
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
                          int64_t nnbt, double momentum, double alpha, int64_t T);
// the backwards: need_dx 0 (no dx), 1 (into dx) or 2 (into dx, or over dy where the entry
// streams dx); they return 1 when dx went over dy
using bwd_t = int32_t (*)(void* dy, void* x, int64_t N, int64_t C, int64_t L, void* mean,
                          void* invstd, void* w, int64_t nw, int32_t need_dx, void* dx,
                          void* dw, void* db, int64_t T);
using eval_t = void (*)(void* x, int64_t N, int64_t C, int64_t L, void* rm, void* rv, void* w,
                        int64_t nw, void* b, int64_t nb, double eps, void* y, int64_t T);
// backward of inference: dx = dy·γ/√(var + ε) (when need_dx) and, added to sums (2, C)
// float64, Σdy·(x − mean) and Σdy
using beval_t = int32_t (*)(void* dy, void* x, int64_t N, int64_t C, int64_t L, void* rm,
                            void* rv, void* w, int64_t nw, double eps, int32_t need_dx,
                            void* dx, double* sums, int64_t T);

// The entries by dtype (float32, float64), layout (rows x channels, (N, C, L)) and pass
// (training forward, backward, inference, backward of inference): resolved by Python
// (batchnorm.kernels._entries.address, which compiles or loads the one asked for) the first
// time a call needs it, so that a process compiles only what its inputs use.
enum Pass { kForward = 0, kBackward = 1, kEval = 2, kEvalBackward = 3 };
std::atomic<void*> ENTRY[2][2][4];
py::object* RESOLVE = nullptr;
// Python's differentiable backward (torch operations), for create_graph=True
py::object* GRAPH_BACKWARD = nullptr;
// the same for inference (batchnorm.functional.graph_backward_eval)
py::object* GRAPH_BACKWARD_EVAL = nullptr;

void* entry(const Tensor& x, int64_t L, Pass pass) {
  const int dt = x.scalar_type() == at::kFloat ? 0 : 1;
  const int layout = L == 0 ? 0 : 1;
  std::atomic<void*>& slot = ENTRY[dt][layout][pass];
  void* p = slot.load(std::memory_order_acquire);
  if (p == nullptr) {
    // also from the autograd engine's threads, which run without the GIL
    py::gil_scoped_acquire gil;
    p = reinterpret_cast<void*>((*RESOLVE)(dt, layout, static_cast<int>(pass)).cast<int64_t>());
    slot.store(p, std::memory_order_release);
  }
  return p;
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
  int64_t T;        // threads (1: the serial loops)
  int64_t axis;     // the channel axis of x, in [0, x.dim())
};

// Whether t's values sit in memory of its own that the kernels may read through data_ptr():
// not a wrapper of torch.func transforms or batched gradients (no storage), not a FakeTensor
// or another tensor Python dispatches (storage without data, or data that is not its values).
// Python routes such calls to torch operations first; this is the second guard.
bool readable(const Tensor& t) {
  const auto keys = t.key_set();
  // (views whose values are not their memory's — a neg-bit or conj-bit view, the efficient
  // zeros autograd may pass as a gradient — go to torch operations, which resolve them)
  return t.has_storage() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::FuncTorchBatched) &&
         !keys.has(c10::DispatchKey::FuncTorchGradWrapper) &&
         !keys.has(c10::DispatchKey::BatchedNestedTensor) &&
         !keys.has(c10::DispatchKey::Negative) && !keys.has(c10::DispatchKey::Conjugate) &&
         !keys.has(c10::DispatchKey::ZeroTensor) && t.data_ptr() != nullptr;
}

// The canonical (N, C, L) of x with its channels on `axis`, as
// batchnorm.functional.canonical_layout views it — contiguous x: (prod(before), C,
// prod(after)), rows x channels when prod(after) is 1; channels innermost in memory
// (channels_last, axis=-1): rows x channels — or nothing for inputs this node leaves to the
// Python path: other dtypes or devices, no values or no memory of its own (the wrappers of
// torch.func transforms), and layouts canonical_layout would copy.
std::optional<Dims> dims_of(const Tensor& x, int64_t axis, int64_t T) {
  const auto dt = x.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || !x.is_cpu() || x.layout() != at::kStrided ||
      !readable(x) || x.dim() < 2 || x.numel() == 0 || x.data_ptr() == nullptr) {
    return std::nullopt;
  }
  const int64_t nd = x.dim();
  const int64_t ax = ((axis % nd) + nd) % nd;
  const int64_t C = x.size(ax);
  if (x.is_contiguous()) {
    int64_t n = 1, l = 1;
    for (int64_t i = 0; i < ax; ++i) n *= x.size(i);
    for (int64_t i = ax + 1; i < nd; ++i) l *= x.size(i);
    return Dims{n, C, l == 1 ? 0 : l, T, ax};
  }
  if (x.movedim(ax, -1).is_contiguous()) return Dims{x.numel() / C, C, 0, T, ax};
  return std::nullopt;
}

// absent, or C contiguous CPU values of x's dtype (what the kernels read as they are)
bool vector_ok(const std::optional<Tensor>& v, const Tensor& x, int64_t C) {
  return !v.has_value() || !v->defined() ||
         (v->scalar_type() == x.scalar_type() && v->is_cpu() &&
          v->layout() == at::kStrided && readable(*v) && v->is_contiguous() &&
          v->numel() == C && v->data_ptr() != nullptr);
}

// Large outputs are reused once nothing but this cache refers to their memory: a training
// loop asks for the same big outputs every step, and memory fresh from the operating system
// costs a page fault per 4 KiB the first time it is written (for a 25 MB activation, more time
// than the pass itself). Buffers of at least 4 MiB sit on 2 MiB boundaries and ask Linux for
// huge pages (as NumPy's large arrays do; elsewhere torch's allocator serves); all start on a
// 64-byte line, whole lines for the streaming stores. Budget and threshold come from Python
// (backend_numba.REUSE_ABOVE and the Function path's cache budget). The autograd engine may
// run a backward while another thread runs a forward: the cache is guarded by a mutex.
struct Outputs {
  struct Held {
    c10::Storage storage;
    size_t bytes;      // its size when made
    const void* data;  // its memory when made
  };
  std::mutex lock;
  std::vector<Held> held;  // least recently used first
  size_t bytes = 0;
  size_t reuse_above = 0;  // 0: no reuse (torch's allocator for every output)
  size_t max_bytes = 0;
};
Outputs OUT;

void release(void* p) { std::free(p); }

constexpr size_t kLine = 64, kHuge = size_t{2} << 20;

// the bytes fresh(nbytes) takes: whole cache lines, or whole huge pages from 4 MiB on (which
// the cache's budget counts: a huge page is resident whole)
size_t allocated(size_t nbytes) {
  const size_t align = nbytes >= 2 * kHuge ? kHuge : kLine;
  return (nbytes + align - 1) / align * align;
}

c10::Storage fresh(size_t nbytes) {
#ifndef __linux__
  return c10::Storage(c10::Storage::use_byte_size_t(), nbytes, c10::GetCPUAllocator(), true);
#else
  const size_t align = nbytes >= 2 * kHuge ? kHuge : kLine;
  const size_t size = allocated(nbytes);
  void* p = std::aligned_alloc(align, size);
  if (p == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(p, size, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  // resizable as torch's own outputs are (a resize_ moves it to torch's allocator)
  return c10::Storage(c10::Storage::use_byte_size_t(), nbytes,
                      c10::DataPtr(p, p, &release, c10::Device(c10::kCPU)),
                      c10::GetCPUAllocator(), true);
#endif
}

// An output shaped and strided like the dense x (channels_last stays channels_last): a tensor
// of its own over reused memory (not a view: in-place operations on it stay legal)
Tensor output_like(const Tensor& x) {
  const size_t n = x.nbytes();
  if (OUT.reuse_above == 0 || n < OUT.reuse_above) return at::empty_like(x);
  const size_t size = allocated(n);  // what the budget counts
  if (size > OUT.max_bytes) {  // beyond the whole budget: not kept after its users
    return at::empty({0}, x.options()).set_(fresh(n), 0, x.sizes(), x.strides());
  }
  c10::Storage st;
  {
    std::lock_guard<std::mutex> guard(OUT.lock);
    auto& h = OUT.held;
    // from the most recently used: the free buffer likeliest still in the cache
    for (size_t i = h.size(); i-- > 0;) {
      const auto& e = h[i];
      if (e.storage.data() != e.data) {
        // moved (a resize_, share_memory_): no longer this cache's memory to hand out
        OUT.bytes -= e.bytes;
        h.erase(h.begin() + static_cast<std::ptrdiff_t>(i));
        continue;
      }
      // only this cache holds it (every tensor and view over it counts)
      if (!st && e.storage.nbytes() == n && e.storage.use_count() == 1) {
        st = e.storage;
        h.erase(h.begin() + static_cast<std::ptrdiff_t>(i));
      }
    }
    if (!st) {
      st = fresh(n);
      OUT.bytes += size;
    }
    h.push_back({st, size, st.data()});  // most recently used last
    // over budget: forget the least recently used (memory still in use is freed by its users)
    while (OUT.bytes > OUT.max_bytes && h.size() > 1) {
      OUT.bytes -= h.front().bytes;
      h.erase(h.begin());
    }
  }
  return at::empty({0}, x.options()).set_(st, 0, x.sizes(), x.strides());
}

// The GIL released while the threaded loops run (they touch no Python object), as torch's own
// operations do: other Python threads go on meanwhile. Single-threaded calls keep it (they take
// microseconds). The autograd engine runs backwards without the GIL.
class Unlocked {
 public:
  explicit Unlocked(int64_t T) {
    if (T > 1 && PyGILState_Check()) state_ = PyEval_SaveThread();
  }
  ~Unlocked() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  Unlocked(const Unlocked&) = delete;
  Unlocked& operator=(const Unlocked&) = delete;

 private:
  PyThreadState* state_ = nullptr;
};

// OpenMP's thread pool does not survive fork(): a backward recorded before a fork and run in
// the child runs its loops on one thread (forward calls in the child get their thread count
// from Python, which knows whether the parent started the pool).
int64_t FORKS = 0;
void forked_child() { ++FORKS; }

// What both nodes keep of a call for their backward: the work split, the fork generation it
// was made in, ε and the channel axis
void save_call(AutogradContext* ctx, const Dims& d, double eps) {
  ctx->saved_data["T"] = d.T;
  ctx->saved_data["forks"] = FORKS;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["axis"] = d.axis;
}

// The threads a backward runs its loops on: the forward's, or one after a fork
int64_t backward_threads(AutogradContext* ctx) {
  return ctx->saved_data["forks"].toInt() == FORKS ? ctx->saved_data["T"].toInt() : 1;
}

// dy in x's layout and dtype: both walk one canonical view
Tensor like_x(const Tensor& dy, const Tensor& x) {
  if (dy.strides() == x.strides() && dy.scalar_type() == x.scalar_type()) return dy;
  return at::empty_like(x).copy_(dy);
}

// Whether dy's memory may take dx: nothing but this backward refers to dy or its memory
// (the autograd engine moved the gradient it made for this node here — say a ReLU's or a
// convolution's backward output — or like_x just copied it), the memory is torch's (or this
// file's) own allocation, not an array lent by NumPy or another library that may still read
// it (torch.from_numpy, DLPack, shared memory), and it is laid out as x. The kernels read
// each value of dy before its place is written. The entry takes the offer where it streams
// dx (kernels._entries._wide_over): dx then lands in lines the layer above has just written,
// in the cache, instead of a buffer that must first come in from memory. A dy anyone else
// still holds — the caller's of y.backward(dy), one a hook kept, a view's storage, a buffer
// of the output cache — has other references and is only read. The entry still gets a dx
// buffer for the case it declines (the decision is the kernels' size rule, in the entry):
// from the output cache that is a lookup, and a buffer it leaves unwritten goes back free.
bool only_here(const Tensor& dy, const Tensor& x) {
  if (!dy.has_storage()) return false;
  const auto& st = dy.storage();
  const auto deleter = st.data_ptr().get_deleter();
  const bool own_memory =
      st.resizable() && deleter != nullptr &&
      (deleter == c10::GetCPUAllocator()->raw_deleter() || deleter == &release);
  return own_memory && dy.use_count() == 1 && st.use_count() == 1 && dy.storage_offset() == 0 &&
         dy.sizes() == x.sizes() && dy.strides() == x.strides() &&
         dy.scalar_type() == x.scalar_type() && !dy.requires_grad() && !dy.is_neg() &&
         !dy.is_conj() && readable(dy);
}

std::atomic<int64_t> OVER_DY{0};  // backwards whose dx went over dy (for tests)

// the need_dx a backward entry gets
int32_t need_dx(bool need_x, const Tensor& dy, const Tensor& x) {
  return need_x ? (only_here(dy, x) ? 2 : 1) : 0;
}

// dx as the entry left it: over dy (it returned 1), or in the buffer it was given
Tensor dx_from(int32_t over, const Tensor& dy, const Tensor& dx) {
  if (over == 0) return dx;
  OVER_DY.fetch_add(1, std::memory_order_relaxed);
  return dy;
}

struct Node : public torch::autograd::Function<Node> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& w,
                        const std::optional<Tensor>& b,
                        const std::optional<Tensor>& rm, const std::optional<Tensor>& rv,
                        const std::optional<Tensor>& nbt, Dims d, double eps, double momentum,
                        double alpha, Tensor* stats, bool* updated) {
    const auto fwd = reinterpret_cast<fwd_t>(entry(x, d.L, kForward));
    Tensor y = output_like(x);
    *stats = at::empty({3, d.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
    void* base = stats->data_ptr();
    const int64_t row = d.C * static_cast<int64_t>(x.element_size());
    char* s = static_cast<char*>(base);
    {
      const Unlocked other_threads_run(d.T);
      *updated = fwd(x.data_ptr(), d.N, d.C, d.L, ptr(w), len(w), ptr(b), len(b), eps,
                       y.data_ptr(), s, s + row, s + 2 * row, ptr(rm), ptr(rv),
                       rm.has_value() ? d.C : 0, ptr(nbt), len(nbt), momentum, alpha,
                       d.T) != 0;
    }
    ctx->save_for_backward({x, or_undefined(w), *stats});
    save_call(ctx, d, eps);
    ctx->saved_data["bias"] = b.has_value();
    return y;
  }

  // grads by reference: dy is moved out of torch's list, so that only_here sees whether
  // anything else holds it
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    variable_list out(13);
    Tensor dy = std::move(grads[0]);
    if (!dy.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& w = saved[1];
    // needs_input_grad counts tensor inputs only: absent w or b shift the ones after them
    const bool has_w = w.defined();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = has_w && ctx->needs_input_grad(1);
    const bool need_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(has_w ? 2 : 1);
    const Tensor& stats = saved[2];
    const int64_t axis = ctx->saved_data["axis"].toInt();
    // the layout is read from x as it comes back: a saved-tensor hook
    // (torch.autograd.graph.saved_tensors_hooks) may return it in another layout or dtype
    const auto d = dims_of(x, axis, ctx->saved_data["T"].toInt());
    const bool kernels_take = d && vector_ok(w, x, d->C) &&
                              stats.scalar_type() == x.scalar_type() && stats.is_cpu() &&
                              readable(stats) && stats.is_contiguous() && stats.dim() == 2 &&
                              stats.size(0) == 3 && stats.size(1) == d->C;
    if (at::GradMode::is_enabled() || !readable(dy) || !kernels_take) {
      // a graph of the backward is wanted, dy has no values to read here (batched
      // gradients: is_grads_batched=True, jacobian(vectorize=True)), or x or the statistics
      // came back from a saved-tensor hook in a form the kernels do not read: Python
      // recomputes the backward with torch operations
      py::gil_scoped_acquire gil;
      py::tuple r = (*GRAPH_BACKWARD)(dy, x, w.defined() ? py::cast(w) : py::none(),
                                      ctx->saved_data["eps"].toDouble(), axis);
      if (need_x) out[0] = r[0].cast<Tensor>();
      if (need_w && !r[1].is_none()) out[1] = r[1].cast<Tensor>();
      if (need_b && !r[2].is_none()) out[2] = r[2].cast<Tensor>();
      return out;
    }
    dy = like_x(dy, x);
    const int64_t C = d->C;
    char* st = static_cast<char*>(stats.data_ptr());  // rows: mean, var, invstd
    const int64_t row = C * static_cast<int64_t>(x.element_size());
    Tensor dx = need_x ? output_like(x) : Tensor();
    Tensor g = at::empty({2, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
    char* gp = static_cast<char*>(g.data_ptr());
    const auto bwd = reinterpret_cast<bwd_t>(entry(x, d->L, kBackward));
    const int32_t over =
        bwd(dy.data_ptr(), x.data_ptr(), d->N, C, d->L, st, st + 2 * row,
            w.defined() ? w.data_ptr() : nullptr, w.defined() ? w.numel() : 0,
            need_dx(need_x, dy, x), need_x ? dx.data_ptr() : x.data_ptr(), gp, gp + row,
            backward_threads(ctx));
    out[0] = dx_from(over, dy, dx);
    if (need_w) out[1] = g[0];
    if (need_b) out[2] = g[1];
    return out;
  }
};

// dγ (into out[3]) and dβ (into out[4]) of inference from the sums Σdy·(x − mean), Σdy
template <typename T>
void per_channel(variable_list& out, bool need_w, bool need_b, const double* s,
                 const Tensor& rv, int64_t C, double eps, const at::TensorOptions& options) {
  const T* var = rv.data_ptr<T>();
  if (need_w) {
    Tensor dw = at::empty({C}, options);
    T* p = dw.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      p[c] = static_cast<T>(s[c] / std::sqrt(static_cast<double>(var[c]) + eps));
    }
    out[3] = dw;
  }
  if (need_b) {
    Tensor db = at::empty({C}, options);
    T* p = db.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<T>(s[C + c]);
    out[4] = db;
  }
}

// Inference with gradients (BN kept in eval mode while the rest trains; gradients with respect
// to the input of an evaluated model): the same single pass forward as without gradients, and
// one pass back — dx = dy·γ/√(var + ε) with Σdy·(x − mean) and Σdy in the same sweep, from
// which dγ and dβ follow per channel. The running statistics are constants here (the
// Python path takes calls where they require gradients).
struct EvalNode : public torch::autograd::Function<EvalNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& rm,
                        const Tensor& rv, const std::optional<Tensor>& w,
                        const std::optional<Tensor>& b, Dims d, double eps) {
    const auto eval = reinterpret_cast<eval_t>(entry(x, d.L, kEval));
    Tensor y = output_like(x);
    {
      const Unlocked other_threads_run(d.T);
      eval(x.data_ptr(), d.N, d.C, d.L, rm.data_ptr(), rv.data_ptr(), ptr(w), len(w), ptr(b),
           len(b), eps, y.data_ptr(), d.T);
    }
    // the statistics as this forward used them: a training step of the same layer before the
    // backward updates the buffers in place (C values each); so is a γ that takes no gradient
    // (a frozen layer's buffer, which an update may change in place). β is not needed (dβ =
    // Σdy): only whether there is one, so that changing it in place before the backward is no
    // error, as in torch.nn
    const bool has_w = w.has_value() && w->defined();
    const Tensor w_used = has_w && !w->requires_grad() ? w->clone() : or_undefined(w);
    ctx->save_for_backward({x, rm.clone(), rv.clone(), w_used});
    ctx->saved_data["has_b"] = b.has_value() && b->defined();
    save_call(ctx, d, eps);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    variable_list out(7);
    Tensor dy = std::move(grads[0]);  // (by reference: see Node::backward)
    if (!dy.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& rm = saved[1];
    const Tensor& rv = saved[2];
    const Tensor& w = saved[3];
    const bool has_b = ctx->saved_data["has_b"].toBool();
    // needs_input_grad counts tensor inputs only (x, rm, rv, then w and b when present)
    const bool has_w = w.defined();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = has_w && ctx->needs_input_grad(3);
    const bool need_b = has_b && ctx->needs_input_grad(has_w ? 4 : 3);
    const int64_t axis = ctx->saved_data["axis"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto d = dims_of(x, axis, ctx->saved_data["T"].toInt());
    const bool kernels_take = d && vector_ok(w, x, d->C) && vector_ok(rm, x, d->C) &&
                              vector_ok(rv, x, d->C);
    if (at::GradMode::is_enabled() || !readable(dy) || !kernels_take) {
      // a graph of the backward, a dy without values of its own, or saved tensors a hook
      // returned in a form the kernels do not read: torch operations in Python
      py::gil_scoped_acquire gil;
      auto opt = [](const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); };
      // β's value does not enter its gradient: zeros stand in for it
      const Tensor b = has_b ? at::zeros_like(rm).requires_grad_(need_b) : Tensor();
      py::list r = (*GRAPH_BACKWARD_EVAL)(
          dy, py::make_tuple(x, rm, rv, opt(w), opt(b)),
          py::make_tuple(need_x, false, false, need_w, need_b), eps, axis);
      for (const int i : {0, 3, 4}) {
        if (!r[i].is_none()) out[i] = r[i].cast<Tensor>();
      }
      return out;
    }
    dy = like_x(dy, x);
    const int64_t C = d->C;
    Tensor dx = need_x ? output_like(x) : Tensor();
    std::vector<double> sums(static_cast<size_t>(2 * C), 0.0);  // Σdy·(x − mean), Σdy
    double* s = sums.data();
    const auto beval = reinterpret_cast<beval_t>(entry(x, d->L, kEvalBackward));
    const int32_t over =
        beval(dy.data_ptr(), x.data_ptr(), d->N, C, d->L, rm.data_ptr(), rv.data_ptr(),
              has_w ? w.data_ptr() : nullptr, has_w ? w.numel() : 0, eps,
              need_dx(need_x, dy, x), need_x ? dx.data_ptr() : x.data_ptr(), s,
              backward_threads(ctx));
    out[0] = dx_from(over, dy, dx);
    // dγ = Σdy·(x − mean)/√(var + ε) and dβ = Σdy, from the float64 sums into x's dtype (the
    // vectors' dtype: vector_ok), per channel here rather than through tensor operations
    const auto vectors = x.options().memory_format(at::MemoryFormat::Contiguous);
    if (x.scalar_type() == at::kFloat) {
      per_channel<float>(out, need_w, need_b, s, rv, C, eps, vectors);
    } else {
      per_channel<double>(out, need_w, need_b, s, rv, C, eps, vectors);
    }
    return out;
  }
};

// ---- half precision (float16, bfloat16) -------------------------------------------------
// torch's own operator reads and writes half values in one pass with float32 statistics
// (batchnorm.functional.AtenBackend); called from here, a layer call is one C++ call, and
// autograd records the operator itself (its backward is torch's, in C++). The operator is
// never handed the running buffers: they are blended here, so that a non-finite batch is
// refused (the operator would blend a NaN in). What this does not take, Python does.

bool is_half(const Tensor& x) {
  const auto dt = x.scalar_type();
  return dt == at::kHalf || dt == at::kBFloat16;
}

// whether x's strides are those x.contiguous(memory_format) gives its shape (C innermost for
// channels_last), size-1 dims included
bool made_strides(const Tensor& x, bool channels_last) {
  const int64_t nd = x.dim();
  std::vector<int64_t> order;
  if (channels_last && nd > 2) {
    order.push_back(1);
    for (int64_t d = nd - 1; d > 1; --d) order.push_back(d);
    order.push_back(0);
  } else {
    for (int64_t d = nd - 1; d >= 0; --d) order.push_back(d);
  }
  int64_t step = 1;
  for (const int64_t d : order) {
    if (x.stride(d) != step) return false;
    step *= x.size(d);
  }
  return true;
}

// x as the operator reads it without a copy, its output then in x's layout: channels on
// dim 1, contiguous or channels_last (4-D) / channels_last_3d (5-D)
bool half_input(const Tensor& x, int64_t axis) {
  if (!is_half(x) || !x.is_cpu() || x.layout() != at::kStrided || !readable(x) ||
      x.dim() < 2 || x.numel() == 0) {
    return false;
  }
  const int64_t nd = x.dim();
  if (((axis % nd) + nd) % nd != 1) return false;
  if (!(x.is_contiguous() || (nd == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
        (nd == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)))) {
    return false;
  }
  // is_contiguous ignores a size-1 dim's stride, torch's CPU backward does not (it returns
  // wrong gradients for t.transpose(1, 2).unsqueeze(-1)): such inputs go to Python, which
  // gives the operator its canonical view (batchnorm.functional._made_strides)
  return made_strides(x, false) || made_strides(x, true);
}

// absent, or C floating-point values on the CPU (converted to float32 where needed)
bool half_vector_ok(const std::optional<Tensor>& v, int64_t C) {
  return !v.has_value() || !v->defined() ||
         (v->is_cpu() && v->layout() == at::kStrided && readable(*v) && v->dim() == 1 &&
          v->numel() == C && at::isFloatingType(v->scalar_type()));
}

// A per-channel vector in float32 (`fill` when absent): the operator then keeps its
// statistics and the parameters' gradients in float32 whatever the parameters' dtype. The
// conversion is recorded by autograd (a half γ gets its gradient back in its dtype).
Tensor float_vector(const std::optional<Tensor>& v, double fill, const Tensor& x) {
  if (v.has_value() && v->defined()) return v->to(at::kFloat);
  return at::full({x.size(1)}, fill, x.options().dtype(at::kFloat));
}

// The running buffers blended as batchnorm.functional.blend_running does on NumPy views: in
// A (float32; float64 for float64 buffers), rounded once into the buffers' dtype B; false,
// nothing written, when a blended value is not finite there (unless the value it replaces was
// not finite either: a broken channel stays so, the others update). One operation per statement and
// no contraction into fused multiply-adds (-ffp-contract=off): NumPy's roundings.
template <typename B, typename A>
bool blend(const Tensor& rm, const Tensor& rv, const float* mean, const float* var, int64_t C,
           double momentum, double alpha) {
  B* m = rm.data_ptr<B>();
  B* v = rv.data_ptr<B>();
  const A mom = static_cast<A>(momentum);
  const A keep = static_cast<A>(1.0 - momentum);
  const A a = static_cast<A>(alpha);
  std::vector<B> new_m(static_cast<size_t>(C)), new_v(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    // (1 − momentum)·running + momentum·batch, as torch.nn writes it: at momentum 1 the
    // batch's value exactly (running + momentum·(batch − running) kept a rounding of the old)
    const A kept_m = static_cast<A>(m[c]) * keep;
    const A added_m = mom * static_cast<A>(mean[c]);
    const A kept = static_cast<A>(v[c]) * keep;
    const A added = a * static_cast<A>(var[c]);
    new_m[c] = static_cast<B>(kept_m + added_m);
    new_v[c] = static_cast<B>(kept + added);
    const bool m_broke = !std::isfinite(static_cast<double>(new_m[c])) &&
                         std::isfinite(static_cast<double>(m[c]));
    const bool v_broke = !std::isfinite(static_cast<double>(new_v[c])) &&
                         std::isfinite(static_cast<double>(v[c]));
    if (m_broke || v_broke) return false;
  }
  std::copy(new_m.begin(), new_m.end(), m);
  std::copy(new_v.begin(), new_v.end(), v);
  return true;
}

bool blend_buffers(const Tensor& rm, const Tensor& rv, const float* mean, const float* var,
                   int64_t C, double momentum, double alpha) {
  switch (rm.scalar_type()) {
    case at::kHalf:
      return blend<at::Half, float>(rm, rv, mean, var, C, momentum, alpha);
    case at::kBFloat16:
      return blend<at::BFloat16, float>(rm, rv, mean, var, C, momentum, alpha);
    case at::kFloat:
      return blend<float, float>(rm, rv, mean, var, C, momentum, alpha);
    default:
      return blend<double, double>(rm, rv, mean, var, C, momentum, alpha);
  }
}

// running buffers the blend takes: absent, or both of one floating dtype, C contiguous CPU
// values of their own, no gradients
bool half_running_ok(const std::optional<Tensor>& rm, const std::optional<Tensor>& rv,
                     int64_t C) {
  if (rm.has_value() != rv.has_value()) return false;
  if (!rm.has_value()) return true;
  if (!rm->defined() || !rv->defined()) return false;
  const auto dt = rm->scalar_type();
  if (rv->scalar_type() != dt ||
      (dt != at::kHalf && dt != at::kBFloat16 && dt != at::kFloat && dt != at::kDouble)) {
    return false;
  }
  for (const Tensor* t : {&*rm, &*rv}) {
    if (!t->is_cpu() || t->layout() != at::kStrided || !readable(*t) || !t->is_contiguous() ||
        t->numel() != C || t->requires_grad()) {
      return false;
    }
  }
  return true;
}

// absent, or one CPU int64
bool counter_ok(const std::optional<Tensor>& nbt) {
  return !nbt.has_value() || !nbt->defined() ||
         (nbt->scalar_type() == at::kLong && nbt->is_cpu() && nbt->numel() == 1 &&
          readable(*nbt) && nbt->is_contiguous());
}

std::tuple<Tensor, Tensor, bool> train_half(
    const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b,
    const std::optional<Tensor>& rm, const std::optional<Tensor>& rv,
    const std::optional<Tensor>& nbt, double eps, double momentum, double alpha) {
  const int64_t C = x.size(1);
  const Tensor wf = float_vector(w, 1.0, x), bf = float_vector(b, 0.0, x);
  Tensor y, mean, invstd;
  // the operator's own running update with momentum 1 into scratch buffers: its unbiased
  // variance, computed directly (1/invstd² − ε cancels when var ≪ ε, and is infinite for
  // ε = 0 and a constant channel)
  const Tensor scratch = at::zeros({2, C}, wf.options());
  const Tensor sm = scratch[0], sv = scratch[1];
  {
    const Unlocked other_threads_run(2);
    std::tie(y, mean, invstd) = at::native_batch_norm(x, wf, bf, sm, sv, true, 1.0, eps);
  }
  // rows: mean, biased variance, invstd
  Tensor stats = at::empty({3, C}, mean.options().memory_format(at::MemoryFormat::Contiguous));
  float* s = stats.data_ptr<float>();
  const Tensor m = mean.contiguous(), inv = invstd.contiguous();
  const float* mp = m.data_ptr<float>();
  const float* ip = inv.data_ptr<float>();
  const float* vp = sv.data_ptr<float>();
  const int64_t n = x.numel() / C;
  // the factor rounded to float32 and the product in float32: what the Python path's
  // tensor-times-Python-float gives, bit for bit
  const float biased = static_cast<float>(
      n > 1 ? static_cast<double>(n - 1) / static_cast<double>(n) : 0.0);
  for (int64_t c = 0; c < C; ++c) {
    s[c] = mp[c];
    s[C + c] = vp[c] * biased;
    s[2 * C + c] = ip[c];
  }
  bool updated = false;
  if (rm.has_value()) {
    const float* var = s + C;
    bool finite = true;  // the variance is not finite whenever the mean is not
    for (int64_t c = 0; c < C && finite; ++c) finite = std::isfinite(var[c]);
    updated = finite && blend_buffers(*rm, *rv, s, var, C, momentum, alpha);
    if (updated && nbt.has_value() && nbt->defined()) ++*nbt->data_ptr<int64_t>();
  }
  return std::make_tuple(y, stats, updated);
}

bool half_eval_ok(const Tensor& x, int64_t axis, const Tensor& rm, const Tensor& rv,
                  const std::optional<Tensor>& w, const std::optional<Tensor>& b) {
  if (!half_input(x, axis)) return false;
  const int64_t C = x.size(1);
  return half_vector_ok(rm, C) && half_vector_ok(rv, C) && half_vector_ok(w, C) &&
         half_vector_ok(b, C) && !rm.requires_grad() && !rv.requires_grad();
}

// inference: the module's vectors as they are when all are x's dtype (the operator computes
// in float32 from them; four conversions cost more than the call), else all in float32
Tensor evaluate_half(const Tensor& x, const Tensor& rm, const Tensor& rv,
                     const std::optional<Tensor>& w, const std::optional<Tensor>& b,
                     double eps) {
  const auto dt = x.scalar_type();
  auto same = [dt](const std::optional<Tensor>& v) {
    return !v.has_value() || !v->defined() || v->scalar_type() == dt;
  };
  const bool as_they_are =
      same(w) && same(b) && rm.scalar_type() == dt && rv.scalar_type() == dt;
  const Tensor wf = as_they_are ? or_undefined(w) : float_vector(w, 1.0, x);
  const Tensor bf = as_they_are ? or_undefined(b) : float_vector(b, 0.0, x);
  // with a graph, the operator saves the statistics for its backward, which would read the
  // buffers as a later training step of the layer left them: a copy (C values) as they are now
  auto recorded = [](const Tensor& v) {
    return at::GradMode::is_enabled() && v.defined() && v.requires_grad();
  };
  const bool graph = recorded(x) || recorded(wf) || recorded(bf);
  const Tensor m0 = as_they_are ? rm : rm.to(at::kFloat);  // (the buffer itself if float32)
  const Tensor v0 = as_they_are ? rv : rv.to(at::kFloat);
  const Tensor m = graph ? m0.clone() : m0;
  const Tensor v = graph ? v0.clone() : v0;
  const Unlocked other_threads_run(2);
  return std::get<0>(at::native_batch_norm(x, wf, bf, m, v, false, 0.0, eps));
}

// tensors made under torch.inference_mode(), used outside it: running buffers that cannot be
// updated in place there (the Python path refuses them by name, as torch does without the
// name), or a call with gradients whose tensors all are such, for which torch's operators
// record no graph (inference tensors have no autograd) and the Python path records none
bool made_for_inference(const Tensor& x, const std::optional<Tensor>& w,
                        const std::optional<Tensor>& b, const std::optional<Tensor>& rm,
                        const std::optional<Tensor>& rv, const std::optional<Tensor>& nbt) {
  if (c10::InferenceMode::is_enabled()) return false;
  auto inference = [](const std::optional<Tensor>& v) {
    return v.has_value() && v->defined() && v->is_inference();
  };
  if (inference(rm) || inference(rv) || inference(nbt)) return true;
  auto absent_or_inference = [&](const std::optional<Tensor>& v) {
    return !v.has_value() || !v->defined() || v->is_inference();
  };
  return at::GradMode::is_enabled() && x.is_inference() && absent_or_inference(w) &&
         absent_or_inference(b);
}

// (y, stats (3, C): mean, biased var, invstd; updated), or None when the node does not take
// the call (see dims_of and vector_ok; running buffers must not require grad, the counter must
// be one CPU int64). T: the threads the kernels would use (batchnorm.kernels._threads).
std::optional<std::tuple<Tensor, Tensor, bool>> train(
    const Tensor& x, int64_t axis, const std::optional<Tensor>& w,
    const std::optional<Tensor>& b, const std::optional<Tensor>& rm,
    const std::optional<Tensor>& rv, const std::optional<Tensor>& nbt, int64_t T, double eps,
    double momentum, double alpha) {
  if (made_for_inference(x, w, b, rm, rv, nbt)) return std::nullopt;
  if (half_input(x, axis)) {
    const int64_t C = x.size(1);
    if (!half_vector_ok(w, C) || !half_vector_ok(b, C) || !half_running_ok(rm, rv, C) ||
        !counter_ok(nbt)) {
      return std::nullopt;
    }
    return train_half(x, w, b, rm, rv, nbt, eps, momentum, alpha);
  }
  const auto d = dims_of(x, axis, T);
  if (!d || !vector_ok(w, x, d->C) || !vector_ok(b, x, d->C)) return std::nullopt;
  if (rm.has_value() != rv.has_value()) return std::nullopt;
  if (rm.has_value() && (!rm->defined() || !rv->defined() || !vector_ok(rm, x, d->C) ||
                         !vector_ok(rv, x, d->C) || rm->requires_grad() ||
                         rv->requires_grad())) {
    return std::nullopt;
  }
  if (!counter_ok(nbt)) return std::nullopt;
  Tensor stats;
  bool updated = false;
  Tensor y = Node::apply(x, w, b, rm, rv, nbt, *d, eps, momentum, alpha, &stats, &updated);
  return std::make_tuple(y, stats, updated);
}

// inference from population statistics, or None when the node does not take the call
std::optional<Tensor> evaluate(const Tensor& x, int64_t axis, const Tensor& rm,
                               const Tensor& rv, const std::optional<Tensor>& w,
                               const std::optional<Tensor>& b, int64_t T, double eps) {
  if (is_half(x)) {
    if (!half_eval_ok(x, axis, rm, rv, w, b)) return std::nullopt;
    return evaluate_half(x, rm, rv, w, b, eps);
  }
  const auto d = dims_of(x, axis, T);
  if (!d || !vector_ok(rm, x, d->C) || !vector_ok(rv, x, d->C) || !vector_ok(w, x, d->C) ||
      !vector_ok(b, x, d->C)) {
    return std::nullopt;
  }
  const auto eval = reinterpret_cast<eval_t>(entry(x, d->L, kEval));
  Tensor y = output_like(x);
  const Unlocked other_threads_run(d->T);
  eval(x.data_ptr(), d->N, d->C, d->L, rm.data_ptr(), rv.data_ptr(), ptr(w), len(w),
                  ptr(b), len(b), eps, y.data_ptr(), d->T);
  return y;
}

// inference recorded for gradients (EvalNode), or None when the node does not take the call:
// as evaluate(), and running statistics that do not require gradients
std::optional<Tensor> evaluate_grad(const Tensor& x, int64_t axis, const Tensor& rm,
                                    const Tensor& rv, const std::optional<Tensor>& w,
                                    const std::optional<Tensor>& b, int64_t T, double eps) {
  if (is_half(x)) {  // the operator is recorded by autograd itself
    if (!half_eval_ok(x, axis, rm, rv, w, b)) return std::nullopt;
    return evaluate_half(x, rm, rv, w, b, eps);
  }
  const auto d = dims_of(x, axis, T);
  if (!d || !vector_ok(rm, x, d->C) || !vector_ok(rv, x, d->C) || !vector_ok(w, x, d->C) ||
      !vector_ok(b, x, d->C) || rm.requires_grad() || rv.requires_grad()) {
    return std::nullopt;
  }
  return EvalNode::apply(x, rm, rv, w, b, *d, eps);
}

// resolve(dtype, layout, pass) -> address of the entry (see entry()); entries resolved before
// are forgotten
void set_kernels(py::object resolve, py::object graph_backward, py::object graph_backward_eval,
                 int64_t reuse_above, int64_t max_bytes) {
  for (auto& by_layout : ENTRY) {
    for (auto& by_pass : by_layout) {
      for (auto& slot : by_pass) slot.store(nullptr, std::memory_order_release);
    }
  }
  delete RESOLVE;
  RESOLVE = new py::object(std::move(resolve));
  delete GRAPH_BACKWARD;
  GRAPH_BACKWARD = new py::object(std::move(graph_backward));
  delete GRAPH_BACKWARD_EVAL;
  GRAPH_BACKWARD_EVAL = new py::object(std::move(graph_backward_eval));
  std::lock_guard<std::mutex> guard(OUT.lock);
  OUT.reuse_above = static_cast<size_t>(reuse_above);
  OUT.max_bytes = static_cast<size_t>(max_bytes);
  OUT.held.clear();
  OUT.bytes = 0;
}

// forget every buffer the output cache holds; the bytes they took (memory still in use is
// freed by its users)
int64_t release_outputs() {
  std::lock_guard<std::mutex> guard(OUT.lock);
  const size_t held = OUT.bytes;
  OUT.held.clear();
  OUT.bytes = 0;
  return static_cast<int64_t>(held);
}

// keep at most max_bytes from now on: the buffers used least recently go first
void set_output_budget(int64_t max_bytes) {
  std::lock_guard<std::mutex> guard(OUT.lock);
  OUT.max_bytes = static_cast<size_t>(max_bytes);
  while (OUT.bytes > OUT.max_bytes && !OUT.held.empty()) {
    OUT.bytes -= OUT.held.front().bytes;
    OUT.held.erase(OUT.held.begin());
  }
}

// buffers the output cache holds (for tests)
int64_t cached_outputs() {
  std::lock_guard<std::mutex> guard(OUT.lock);
  return static_cast<int64_t>(OUT.held.size());
}

int64_t written_over_dy() { return OVER_DY.load(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef __unix__
  pthread_atfork(nullptr, nullptr, &forked_child);
#endif
  m.def("set_kernels", &set_kernels);
  m.def("train", &train);
  m.def("evaluate", &evaluate);
  m.def("evaluate_grad", &evaluate_grad);
  m.def("cached_outputs", &cached_outputs);
  m.def("release_outputs", &release_outputs);
  m.def("set_output_budget", &set_output_budget);
  m.def("written_over_dy", &written_over_dy);
}
