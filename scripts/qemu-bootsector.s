# qemu-bootsector.s: the guest scripts/compare-qemu.sh migrates in QEMU.
#
# A 512-byte boot sector that BIOS loads at 0x7c00. It switches to 32-bit
# protected mode with flat 4 GiB segments and then, forever, adds one to
# byte 0 of every 4 KiB page in [1 MiB, 100 MiB): a 99 MiB writable working
# set rewritten as fast as the CPU (for QEMU: TCG) runs, the shape of the
# guest in QEMU's own migration test. After each full pass it writes 'B' to
# the first serial port, so the script can tell that the guest runs (the
# first 'B': every page written once) and how fast (passes per second).
#
# Build (GNU binutils):
#   as --32 -o b.o qemu-bootsector.s
#   ld -m elf_i386 -Ttext=0x7c00 -e start -o b.elf b.o
#   objcopy -O binary -j .text b.elf b.img      # exactly 512 bytes

        .set FIRST, 0x100000            # 1 MiB
        .set END, 0x6400000             # 100 MiB
        .set PAGE, 4096
        .set COM1, 0x3f8
        .set CODE_SEL, 0x08             # gdt entry 1
        .set DATA_SEL, 0x10             # gdt entry 2

        .text
        .code16
        .globl start
start:
        cli                             # no IDT in protected mode: no interrupts
        xorw %ax, %ax
        movw %ax, %ds                   # lgdt reads gdt_ptr through %ds

        # Open the A20 gate (the "fast A20" bit of port 0x92), or every
        # address with bit 20 set would wrap onto the one without it.
        inb $0x92, %al
        orb $0x02, %al
        andb $0xfe, %al                 # bit 0 would reset the machine
        outb %al, $0x92

        lgdt gdt_ptr
        movl %cr0, %eax
        orl $1, %eax                    # CR0.PE
        movl %eax, %cr0
        ljmpl $CODE_SEL, $protected     # reloads %cs: now 32-bit code

        .code32
protected:
        movw $DATA_SEL, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $COM1, %dx
        movb $'A', %al                  # started
        outb %al, %dx

pass:
        movl $FIRST, %ebx
page:
        incb (%ebx)
        addl $PAGE, %ebx
        cmpl $END, %ebx
        jb page
        movb $'B', %al                  # one full pass done
        outb %al, %dx
        jmp pass

        # Null, code and data descriptors: base 0, limit 4 GiB (4 KiB
        # granularity), 32-bit.
        .p2align 3
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff        # code: present, ring 0, execute/read
        .quad 0x00cf92000000ffff        # data: present, ring 0, read/write
gdt_ptr:
        .word gdt_ptr - gdt - 1         # limit
        .long gdt                       # base

        .org 510
        .byte 0x55, 0xaa                # the boot signature BIOS checks
