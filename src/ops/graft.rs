//! Attaching a hand-written backward to a forward computed outside candle's graph.
//!
//! candle computes gradients for every operand of a tracked op, frozen or not, and several fused
//! candle-nn kernels have no backward. A grafted op runs its forward with any candle ops on
//! detached inputs, then re-enters the graph as one custom op whose backward is ours: it returns
//! gradients only for the inputs that are tracked, so no frozen tensor ever receives one.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, TensorId,
};
use std::sync::Mutex;

/// Backward of a one-input op: `(input, grad_out) -> grad_input`.
pub type Backward1 = Box<dyn Fn(&Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;
/// Backward of a two-input op: `(a, b, grad_out, needs_grad) -> (grad_a, grad_b)`; inputs are
/// detached, `needs_grad[i]` says whether input `i` is tracked (skip its gradient when not).
pub type Backward2 = Box<
    dyn Fn(&Tensor, &Tensor, &Tensor, [bool; 2]) -> Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync,
>;
/// Backward of a three-input op: `(a, b, c, grad_out, needs_grad) -> (grad_a, grad_b, grad_c)`.
pub type Backward3 = Box<
    dyn Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            [bool; 3],
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync,
>;

/// Backward of an op grafted onto one input that also uses trainable tensors it does not take as
/// inputs (see [`graft_carrying`]):
/// `(input, grad_out, input_tracked) -> grad_input`.
pub type BackwardCarrying =
    Box<dyn Fn(&Tensor, &Tensor, bool) -> Result<Option<Tensor>> + Send + Sync>;

/// Backward of a three-input op that reads its own output:
/// `(a, b, c, out, grad_out, needs_grad) -> (grad_a, grad_b, grad_c)`.
pub type Backward3Out = Box<
    dyn Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            [bool; 3],
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync,
>;

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` without recording backward information in our ops (evaluation, generation): grafted
/// ops return their forward result directly and the loss skips its gradient.
pub fn without_grad<T>(f: impl FnOnce() -> T) -> T {
    let before = NO_GRAD.with(|c| c.replace(true));
    let out = f();
    NO_GRAD.with(|c| c.set(before));
    out
}

/// Whether ops should record what their backward needs.
pub fn grad_enabled() -> bool {
    !NO_GRAD.with(|c| c.get())
}

/// A forward result: a tensor, or f32 elements a CPU kernel computed (handed over without a copy).
enum Ready {
    Tensor(Tensor),
    Host(Vec<f32>, Shape),
}

/// A grafted op's forward result: a tensor, or the f32 elements a CPU kernel wrote, which become
/// the op's output storage as they are (a tensor is copied into candle's graph).
pub struct Output(Ready);

impl From<Tensor> for Output {
    fn from(t: Tensor) -> Self {
        Output(Ready::Tensor(t))
    }
}

impl Output {
    /// f32 elements in `shape` (row-major), on the CPU.
    pub fn host(data: Vec<f32>, shape: impl Into<Shape>) -> Self {
        Output(Ready::Host(data, shape.into()))
    }

    /// The same elements in another shape.
    pub fn reshape(self, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        Ok(match self.0 {
            Ready::Tensor(t) => Output(Ready::Tensor(t.reshape(shape)?)),
            Ready::Host(data, old) if old.elem_count() == shape.elem_count() => {
                Output(Ready::Host(data, shape))
            }
            Ready::Host(_, old) => {
                candle_core::bail!("cannot reshape {old:?} to {shape:?}")
            }
        })
    }

    /// The result as a tensor (outside any graph).
    pub fn into_tensor(self) -> Result<Tensor> {
        match self.0 {
            Ready::Tensor(t) => Ok(t),
            Ready::Host(data, shape) => Tensor::from_vec(data, shape, &candle_core::Device::Cpu),
        }
    }
}

/// The forward result waiting to be handed to candle, taken exactly once.
struct Pending(Mutex<Option<Ready>>);

impl Pending {
    fn new(out: Output) -> Self {
        Pending(Mutex::new(Some(out.0)))
    }

    fn take(&self) -> Result<Ready> {
        let mut slot = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("grafted op: poisoned lock".into()))?;
        slot.take()
            .ok_or_else(|| candle_core::Error::Msg("grafted op: forward ran twice".into()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = match self.take()? {
            Ready::Host(data, shape) => return Ok((CpuStorage::F32(data), shape)),
            Ready::Tensor(out) => out,
        };
        let shape = out.shape().clone();
        let flat = out.flatten_all()?;
        let storage = match out.dtype() {
            DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            DType::F16 => CpuStorage::F16(flat.to_vec1()?),
            DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
            dtype => candle_core::bail!("grafted op: unsupported dtype {dtype:?}"),
        };
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let Ready::Tensor(out) = self.take()? else {
            candle_core::bail!("grafted op: a CPU kernel's result reached a cuda op")
        };
        let shape = out.shape().clone();
        let (storage, layout) = out.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            candle_core::bail!("grafted op: expected a cuda tensor")
        };
        // One device copy of exactly the output's elements, whatever its layout (a strided
        // copy into a fresh buffer; the result's storage cannot be moved out of its tensor).
        // SAFETY: `copy_strided_src` writes every element of the buffer before it is read.
        let mut copy = unsafe { s.device().alloc_uninit(&shape, out.dtype())? };
        s.copy_strided_src(&mut copy, 0, layout)?;
        Ok((copy, shape))
    }
}

struct Graft1 {
    name: &'static str,
    out: Pending,
    backward: Backward1,
}

impl CustomOp1 for Graft1 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(&arg.detach(), grad)
    }
}

struct Graft2 {
    name: &'static str,
    out: Pending,
    backward: Backward2,
}

impl CustomOp2 for Graft2 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let needs = [a.track_op(), b.track_op()];
        let (ga, gb) = (self.backward)(&a.detach(), &b.detach(), grad, needs)?;
        Ok((ga.filter(|_| needs[0]), gb.filter(|_| needs[1])))
    }
}

/// A three-input op's backward: with or without the op's output.
enum Backward3Kind {
    Plain(Backward3),
    WithOutput(Backward3Out),
}

struct Graft3 {
    name: &'static str,
    out: Pending,
    backward: Backward3Kind,
}

impl CustomOp3 for Graft3 {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let needs = [a.track_op(), b.track_op(), c.track_op()];
        let (a, b, c) = (a.detach(), b.detach(), c.detach());
        let (ga, gb, gc) = match &self.backward {
            Backward3Kind::Plain(f) => f(&a, &b, &c, grad, needs)?,
            Backward3Kind::WithOutput(f) => f(&a, &b, &c, &res.detach(), grad, needs)?,
        };
        Ok((
            ga.filter(|_| needs[0]),
            gb.filter(|_| needs[1]),
            gc.filter(|_| needs[2]),
        ))
    }
}

/// Returns `out` (computed from `x` outside the graph) as a tracked result of `x` with `backward`.
/// When `x` is not tracked, `out` is returned as is and no graph node is made.
pub fn graft1(
    name: &'static str,
    x: &Tensor,
    out: impl Into<Output>,
    backward: Backward1,
) -> Result<Tensor> {
    let out = out.into();
    if !x.track_op() || !grad_enabled() {
        return out.into_tensor();
    }
    x.apply_op1(Graft1 {
        name,
        out: Pending::new(out),
        backward,
    })
}

/// [`graft1`] onto `x` for an op that also uses trainable tensors `vars` it does not take as
/// inputs (a decoder layer's LoRA pairs, a checkpointed block's weights). Its backward computes
/// their gradients along with `x`'s and hands each to `park`; they reach candle's gradient store
/// through the graph itself: the op also reads a scalar that `vars` feed through identity ops
/// ("carriers"), whose backward (run after the op's, as they come before it) returns the parked
/// gradients as theirs. So a plain `loss.backward()` holds every gradient, and the op stays in
/// the graph even when `x` is not tracked (the first layer's input comes from a frozen embedding).
pub fn graft_carrying(
    name: &'static str,
    x: &Tensor,
    vars: &[Tensor],
    out: impl Into<Output>,
    backward: BackwardCarrying,
) -> Result<Tensor> {
    if vars.is_empty() || !grad_enabled() {
        return graft1(name, x, out, Box::new(move |x, g| backward(x, g, true)));
    }
    let slot = GradSlot::default();
    let carried = carrier(vars, &slot)?;
    graft2(
        name,
        x,
        &carried,
        out,
        Box::new(move |x, carried, g, needs| {
            let grad_x = slot.collect(|| backward(x, g, needs[0]))?;
            // The carriers' backward runs only when their output received a gradient.
            Ok((grad_x, Some(carried.zeros_like()?)))
        }),
    )
}

/// Gradients an op's backward computed for tensors it does not take as inputs, waiting for the
/// carriers ([`graft_carrying`]) to hand them to candle. Keyed by the tensor's id.
#[derive(Clone, Default)]
struct GradSlot(std::sync::Arc<Mutex<Vec<(TensorId, Tensor)>>>);

thread_local! {
    /// The slot of the op whose backward is running on this thread (innermost first).
    static COLLECTING: std::cell::RefCell<Vec<GradSlot>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl GradSlot {
    /// Runs `f` (an op's backward) with [`park`] adding to this slot.
    fn collect<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        COLLECTING.with(|c| c.borrow_mut().push(self.clone()));
        let out = f();
        COLLECTING.with(|c| c.borrow_mut().pop());
        out
    }

    /// Adds `grad` to what the slot holds for `id`.
    fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut held = self.lock()?;
        match held.iter_mut().find(|(i, _)| *i == id) {
            Some((_, total)) => *total = (&*total + &grad)?,
            None => held.push((id, grad)),
        }
        Ok(())
    }

    /// Takes the gradient held for `id`, if any.
    fn take(&self, id: TensorId) -> Result<Option<Tensor>> {
        let mut held = self.lock()?;
        Ok(held
            .iter()
            .position(|(i, _)| *i == id)
            .map(|at| held.swap_remove(at).1))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<(TensorId, Tensor)>>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient slot: poisoned lock".into()))
    }
}

/// Hands the gradient of `var` (a trainable tensor the running op uses without taking it as an
/// input) to that op's carriers ([`graft_carrying`]). A second gradient of the same tensor
/// (chunks of rows) is added to the first at once, so a slot holds one copy per tensor. Called
/// outside such an op's backward, it is an error: the gradient would be lost.
pub(crate) fn park(var: &Tensor, grad: Tensor) -> Result<()> {
    let slot = COLLECTING.with(|c| c.borrow().last().cloned());
    match slot {
        Some(slot) => slot.add(var.id(), grad),
        None => candle_core::bail!(
            "a weight gradient was computed outside the backward of the op that uses the weight"
        ),
    }
}

/// A scalar (zero) that `vars` feed through identity ops whose backward returns, for each of
/// them, what the op's backward parked in `slot`: two tensors per carrier.
fn carrier(vars: &[Tensor], slot: &GradSlot) -> Result<Tensor> {
    let mut carried = Tensor::zeros((), DType::F32, vars[0].device())?;
    for pair in vars.chunks(2) {
        let s = slot.clone();
        carried = match pair {
            [a, b] => {
                let (ia, ib) = (a.id(), b.id());
                graft3(
                    "carry-gradients",
                    &carried,
                    a,
                    b,
                    carried.clone(),
                    Box::new(move |_, _, _, g, needs| {
                        Ok((needs[0].then(|| g.clone()), s.take(ia)?, s.take(ib)?))
                    }),
                )?
            }
            [a] => {
                let ia = a.id();
                graft2(
                    "carry-gradients",
                    &carried,
                    a,
                    carried.clone(),
                    Box::new(move |_, _, g, needs| Ok((needs[0].then(|| g.clone()), s.take(ia)?))),
                )?
            }
            _ => unreachable!("chunks of two"),
        };
    }
    Ok(carried)
}

/// Two-input version of [`graft1`]; the backward's gradients for untracked inputs are dropped.
pub fn graft2(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    out: impl Into<Output>,
    backward: Backward2,
) -> Result<Tensor> {
    let out = out.into();
    if (!a.track_op() && !b.track_op()) || !grad_enabled() {
        return out.into_tensor();
    }
    a.apply_op2(
        b,
        Graft2 {
            name,
            out: Pending::new(out),
            backward,
        },
    )
}

/// Three-input version of [`graft1`]; the backward's gradients for untracked inputs are dropped.
pub fn graft3(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    out: impl Into<Output>,
    backward: Backward3,
) -> Result<Tensor> {
    apply3(name, (a, b, c), out.into(), Backward3Kind::Plain(backward))
}

/// [`graft3`] whose backward also receives the op's output, so the forward need not keep a copy
/// of its own.
pub fn graft3_with_output(
    name: &'static str,
    inputs: (&Tensor, &Tensor, &Tensor),
    out: Output,
    backward: Backward3Out,
) -> Result<Tensor> {
    apply3(name, inputs, out, Backward3Kind::WithOutput(backward))
}

fn apply3(
    name: &'static str,
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    out: Output,
    backward: Backward3Kind,
) -> Result<Tensor> {
    if (!a.track_op() && !b.track_op() && !c.track_op()) || !grad_enabled() {
        return out.into_tensor();
    }
    a.apply_op3(
        b,
        c,
        Graft3 {
            name,
            out: Pending::new(out),
            backward,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A weight gradient handed over outside an op's backward would be lost: an error.
    #[test]
    fn parking_outside_a_carrying_op_is_an_error() {
        let w = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        assert!(park(w.as_tensor(), w.as_tensor().ones_like().unwrap()).is_err());
    }

    /// The weight an op uses without taking it as an input gets its gradient from a plain
    /// `backward()`, once per use summed, and the input's gradient is the op's.
    #[test]
    fn a_carrying_op_delivers_its_weight_gradients_through_backward() {
        let dev = Device::Cpu;
        let x = Var::new(&[1f32, 2.0, 3.0], &dev).unwrap();
        let (w, v) = (
            Var::new(&[0.5f32, -1.0, 2.0], &dev).unwrap(),
            Var::new(&[3f32], &dev).unwrap(),
        );
        // y = x * w * v, computed outside the graph.
        let y = ((x.as_tensor() * w.as_tensor()).unwrap() * 3.0).unwrap();
        let (wc, vc) = (w.as_tensor().clone(), v.as_tensor().clone());
        let out = graft_carrying(
            "test",
            x.as_tensor(),
            &[wc.clone(), vc.clone()],
            y,
            Box::new(move |x, g, _| {
                // Parked in two halves: the slot sums them.
                let gw = ((x * g)? * 3.0)?;
                park(&wc, (&gw * 0.25)?)?;
                park(&wc, (&gw * 0.75)?)?;
                let gv = (x * &wc)?.mul(g)?.sum_all()?.reshape(1)?;
                park(&vc, gv)?;
                Ok(Some(((g * &wc)? * 3.0)?))
            }),
        )
        .unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let got = |t: &Var| grads.get(t).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got(&x), [1.5, -3.0, 6.0]);
        assert_eq!(got(&w), [3.0, 6.0, 9.0]);
        assert_eq!(got(&v), [4.5]);
        assert_eq!(
            grads.get_ids().count(),
            3,
            "only the variables keep gradients"
        );
    }
}
