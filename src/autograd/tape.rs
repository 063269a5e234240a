//! The tape: a list of nodes in recording order, walked backwards (micrograd's idea, with tensors).
//!
//! A [`Var`] is a value (a contiguous f32 [`Tensor`]) plus, when it needs a gradient, the index of
//! its node. Leaves made by [`Tape::param`] need one; [`Tape::constant`]s do not. An op records a
//! node only if one of its inputs needs a gradient and recording is on ([`Tape::no_grad`] turns
//! it off), so frozen weights and inference cost nothing but the forward. A node holds the
//! indices of its inputs and a closure from the output gradient to the input gradients, which
//! captures exactly the tensors it needs and is dropped when it has run.
//! [`Tape::backward`] seeds the scalar loss with 1, visits nodes from last to first and
//! accumulates (sums) gradients where a value was used more than once.
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::cell::{Cell, RefCell};

/// Output gradient → one gradient per input (`None`: that input needs none).
pub type Backward = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    inputs: Vec<Option<usize>>,
    backward: Option<Backward>,
}

/// A value on the tape.
#[derive(Clone, Debug)]
pub struct Var {
    value: Tensor,
    id: Option<usize>,
}

impl Var {
    pub fn value(&self) -> &Tensor {
        &self.value
    }
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    /// Whether a gradient flows to this value.
    pub fn requires_grad(&self) -> bool {
        self.id.is_some()
    }
    pub fn id(&self) -> Option<usize> {
        self.id
    }
    /// The scalar value (first element).
    pub fn item(&self) -> f32 {
        self.value.f32_data()[0]
    }
}

#[derive(Default)]
pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    paused: Cell<bool>,
}

/// The gradients of the leaves after [`Tape::backward`].
pub struct Grads {
    grads: Vec<Option<Tensor>>,
}

impl Grads {
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        v.id.and_then(|i| self.grads.get(i)).and_then(|g| g.as_ref())
    }
    /// Moves the gradient out (the trainer's way to avoid a copy).
    pub fn take(&mut self, v: &Var) -> Option<Tensor> {
        v.id.and_then(|i| self.grads.get_mut(i)).and_then(|g| g.take())
    }
}

/// `a + b` elementwise for two same-shape contiguous tensors.
fn accumulate(a: Tensor, b: Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(crate::shape_err!("gradient shapes {:?} and {:?} do not match", a.shape(), b.shape()));
    }
    use rayon::prelude::*;
    let mut v = a.into_f32_vec(); // the earlier gradient's own buffer when nothing else holds it
    let bd = b.f32_data();
    v.par_chunks_mut(1 << 14).zip(bd.par_chunks(1 << 14)).for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
    Tensor::from_vec(v, b.shape())
}

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    fn push(&self, inputs: Vec<Option<usize>>, backward: Option<Backward>) -> usize {
        let mut n = self.nodes.borrow_mut();
        n.push(Node { inputs, backward });
        n.len() - 1
    }

    /// A leaf that needs a gradient (a trainable parameter), contiguous f32.
    pub fn param(&self, t: Tensor) -> Var {
        let value = crate::autograd::f32_contiguous(&t);
        Var { value, id: Some(self.push(vec![], None)) }
    }

    /// A value that needs no gradient (data, frozen weights).
    pub fn constant(&self, t: Tensor) -> Var {
        Var { value: crate::autograd::f32_contiguous(&t), id: None }
    }

    /// Whether ops record nodes right now.
    pub fn recording(&self) -> bool {
        !self.paused.get()
    }

    /// Runs `f` with recording off: everything it computes is a constant.
    pub fn no_grad<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.paused.replace(true);
        let r = f();
        self.paused.set(was);
        r
    }

    /// Number of nodes recorded (leaves included).
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The generic op: `value` computed from `inputs`; `backward` maps the output gradient to one
    /// gradient per input (same order, same shapes). Records a node only when some input needs a
    /// gradient and recording is on; `backward` is otherwise dropped unrun.
    pub fn custom(&self, inputs: &[&Var], value: Tensor, backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static) -> Var {
        let ids: Vec<Option<usize>> = inputs.iter().map(|v| v.id).collect();
        if !self.recording() || ids.iter().all(|i| i.is_none()) {
            return Var { value, id: None };
        }
        let id = self.push(ids, Some(Box::new(backward)));
        Var { value, id: Some(id) }
    }

    /// Back-propagates from the scalar `loss` (seed 1). Nodes are consumed: call once per tape.
    pub fn backward(&self, loss: &Var) -> Result<Grads> {
        self.backward_from(loss, Tensor::from_vec(vec![1.0], loss.shape())?)
    }

    /// Back-propagates `seed` (the gradient of some scalar with respect to `out`).
    pub fn backward_from(&self, out: &Var, seed: Tensor) -> Result<Grads> {
        if out.value.numel() != seed.numel() {
            return Err(crate::shape_err!("backward: seed of {} values for an output of shape {:?}", seed.numel(), out.shape()));
        }
        let Some(root) = out.id else { return Err(Error::msg("backward: the output does not depend on any parameter")) };
        let mut nodes = self.nodes.borrow_mut();
        let mut grads: Vec<Option<Tensor>> = vec![None; nodes.len()];
        grads[root] = Some(seed.reshape(out.shape())?);
        for i in (0..=root).rev() {
            let Some(bw) = nodes[i].backward.take() else { continue }; // a leaf keeps its gradient
            let Some(g) = grads[i].take() else { continue };
            let inputs = std::mem::take(&mut nodes[i].inputs);
            let gin = bw(&g)?;
            if gin.len() != inputs.len() {
                return Err(Error::msg(format!("backward rule of node {i} returned {} gradients for {} inputs", gin.len(), inputs.len())));
            }
            for (inp, gi) in inputs.into_iter().zip(gin) {
                let (Some(j), Some(gi)) = (inp, gi) else { continue };
                grads[j] = Some(match grads[j].take() {
                    None => gi,
                    Some(prev) => accumulate(prev, gi)?,
                });
            }
        }
        Ok(Grads { grads })
    }
}
